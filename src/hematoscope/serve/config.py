"""Settings of the web app: one pydantic-settings class, read from arguments or environment
variables prefixed ``HEMATOSCOPE_`` (e.g. ``HEMATOSCOPE_TOKEN``). Built only when the app is
created, so tests pass their own :class:`Settings` instead of patching globals."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


#: Names of this machine, always trusted in the Host header.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: Listen addresses that mean "every interface" (they name no host).
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case, the port left out when it is the scheme's
    default; None for anything that is not an http(s) origin (``null``, a path, junk)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


class Settings(BaseSettings):
    """Configuration of ``hematoscope serve``.

    Attributes:
        models: bundle directories or zips to serve, first = default; empty = the shipped model.
        token: when set, every ``/api`` endpoint except ``/api/health`` needs
            ``Authorization: Bearer <token>`` (health then shows the history count only with it).
        db: SQLite history file; None = ``hematoscope.paths.data_dir()/history.sqlite3``.
        max_upload_mb: largest accepted request body (413 above it).
        body_timeout_s: longest wait for the next part of a request body; a client that stalls
            mid-upload gets 408 and its connection is freed.
        max_image_pixels: largest accepted image (per-file error, 422 when nothing is left).
        max_request_megapixels: most decoded pixels in one request, all images together, read
            from the image headers before anything is decoded (413 above it).
        max_decoded_megapixels: most decoded pixels held at once by the whole server; each
            request decodes its images batch by batch within this budget (waiting for it when
            other requests hold it). At least ``max_image_pixels``.
        max_files: most images per request (a zip counts its members); separate file parts stop
            at 1000 before this applies (the multipart parser's own limit).
        workers: threads that decode images, make thumbnails and explanations at once (the model
            itself runs in one batching thread per served model).
        max_concurrent: analyses in progress at once (decoding, waiting for the model, storing);
            as many again may wait for a place, further requests get 503 with Retry-After.
        batch_size: most images per model call; concurrent requests share a call.
        batch_wait_ms: how long the first request of a model batch waits for others to join.
        max_queued_images: most images waiting for the model; a request that would pass it gets
            503 with Retry-After.
        gradcam_max: Grad-CAM is computed for at most this many images per request.
        allowed_hosts: host names the server answers to besides ``localhost``, ``127.0.0.1``,
            ``[::1]`` and a specific ``host`` it listens on (``Host`` header; 400 otherwise).
            ``*`` turns the check off; ``*.example.org`` allows subdomains.
        allowed_origins: other origins (``https://lab.example.org``) whose pages may send
            state-changing requests (POST, PATCH, PUT, DELETE); the server's own origin is
            always allowed. A request whose ``Origin`` (or, without one, ``Referer``) is another
            site is refused with 403 (cross-site request forgery guard).
        retention_days: analyses older than this are deleted (at start-up and after each new
            analysis); None keeps them until deleted.
        classes: answer only among these classes with every served model (e.g. the five white
            cells of a 5-part differential); empty = all of each model's classes.
        recolour: served models with a framing search also try its colour changes
            (``predict --recolour``, :meth:`Bundle.set_recolour`).
        ood_accept: operating point of every served model's unlike-training flag, the share of
            its validation cells it accepts (``predict --ood-accept``,
            :meth:`Bundle.set_ood_accept`); None: as fitted.
        adapt_dir: where models adapted from the web app (``POST /api/models/adapt``) are saved,
            one folder each; those already there are served after ``models`` at start-up. None:
            adapting from the web app is off (403).
    """

    model_config = SettingsConfigDict(env_prefix="HEMATOSCOPE_", extra="ignore")

    models: list[Path] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    token: SecretStr | None = None
    db: Path | None = None
    max_upload_mb: float = Field(default=64.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_image_pixels: int = Field(default=25_000_000, gt=0)
    max_request_megapixels: float = Field(default=500.0, gt=0)
    max_decoded_megapixels: float = Field(default=200.0, gt=0)
    max_files: int = Field(default=2000, gt=0)
    workers: int = Field(default=2, ge=1, le=64)
    max_concurrent: int = Field(default=64, ge=1, le=4096)
    batch_size: int = Field(default=64, ge=1, le=4096)
    batch_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    max_queued_images: int = Field(default=1024, ge=1)
    gradcam_max: int = Field(default=500, ge=0)
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    retention_days: float | None = Field(default=None, gt=0)
    classes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    recolour: bool = False
    ood_accept: float | None = None
    adapt_dir: Path | None = None

    @field_validator("allowed_hosts", "allowed_origins", "classes", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        """``HEMATOSCOPE_ALLOWED_HOSTS=a.example,b.example`` as well as a list."""
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.max_decoded_pixels < self.max_image_pixels:
            raise ValueError(f"max_decoded_megapixels ({self.max_decoded_megapixels:g}) must hold at least one "
                             f"image of max_image_pixels ({self.max_image_pixels / 1e6:g} megapixels)")
        for pattern in self.allowed_hosts:
            if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
                raise ValueError(f"allowed host {pattern!r}: wildcards must look like '*.example.org' (or '*')")
        origins = []
        for origin in self.allowed_origins:
            if normalise_origin(origin) is None:
                raise ValueError(f"allowed origin {origin!r} must look like https://host[:port] "
                                 "(scheme and host, no path)")
            origins.append(normalise_origin(origin))
        self.allowed_origins = origins
        return self

    @property
    def max_request_pixels(self) -> int:
        return int(self.max_request_megapixels * 1e6)

    @property
    def max_decoded_pixels(self) -> int:
        return int(self.max_decoded_megapixels * 1e6)

    def trusted_hosts(self) -> list[str]:
        """Host names accepted in the ``Host`` header (for Starlette's TrustedHostMiddleware)."""
        hosts = list(LOCAL_HOSTS)
        bind = f"[{self.host}]" if ":" in self.host else self.host
        if self.host not in WILDCARD_ADDRESSES and bind not in hosts:
            hosts.append(bind)
        return hosts + [h for h in self.allowed_hosts if h not in hosts]

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
