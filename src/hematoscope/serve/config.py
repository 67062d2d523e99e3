"""Settings of the web app: one pydantic-settings class, read from arguments or environment
variables prefixed ``HEMATOSCOPE_`` (e.g. ``HEMATOSCOPE_TOKEN``). Built only when the app is
created, so tests pass their own :class:`Settings` instead of patching globals."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of ``hematoscope serve``.

    Attributes:
        models: bundle directories or zips to serve, first = default; empty = the shipped model.
        token: when set, every ``/api`` endpoint except ``/api/health`` needs
            ``Authorization: Bearer <token>``.
        db: SQLite history file; None = ``hematoscope.paths.data_dir()/history.sqlite3``.
        max_upload_mb: largest accepted request body (413 above it).
        max_image_pixels: largest accepted image (per-file error, 422 when nothing is left).
        max_files: most images per request (a zip counts its members).
        workers: size of the inference thread pool.
        gradcam_max: Grad-CAM is computed for at most this many images per request.
    """

    model_config = SettingsConfigDict(env_prefix="HEMATOSCOPE_", extra="ignore")

    models: list[Path] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    token: SecretStr | None = None
    db: Path | None = None
    max_upload_mb: float = Field(default=64.0, gt=0)
    max_image_pixels: int = Field(default=25_000_000, gt=0)
    max_files: int = Field(default=2000, gt=0)
    workers: int = Field(default=2, ge=1, le=64)
    gradcam_max: int = Field(default=500, ge=0)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def db_path(self) -> Path:
        if self.db is not None:
            return Path(self.db)
        from hematoscope.paths import data_dir

        return data_dir() / "history.sqlite3"

    def token_value(self) -> str | None:
        value = self.token.get_secret_value() if self.token is not None else None
        return value or None
