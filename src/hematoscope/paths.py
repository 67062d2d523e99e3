"""Where hematoscope keeps caches and user data (never inside an input data folder)."""
from __future__ import annotations

import os
from pathlib import Path


def _user_dir(env: str, platform_dir: str, parts: tuple[str, ...]) -> Path:
    """``$env`` or the platform's ``platform_dir`` (a :mod:`platformdirs` function name) for
    hematoscope, with ``parts`` appended (created)."""
    root = os.environ.get(env)
    if not root:
        import platformdirs

        root = getattr(platformdirs, platform_dir)("hematoscope")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(*parts: str) -> Path:
    """``$HEMATOSCOPE_CACHE`` or the platform user cache dir, with ``parts`` appended (created)."""
    return _user_dir("HEMATOSCOPE_CACHE", "user_cache_dir", parts)


def data_dir(*parts: str) -> Path:
    """``$HEMATOSCOPE_HOME`` or the platform user data dir (history database, settings)."""
    return _user_dir("HEMATOSCOPE_HOME", "user_data_dir", parts)


def default_data_root(explicit: Path | str | None = None) -> Path:
    """An explicit data root, else ``$HEMATOSCOPE_DATA``; raise a clear error when neither is set."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("HEMATOSCOPE_DATA")
    if env:
        return Path(env)
    raise FileNotFoundError("no data path given and $HEMATOSCOPE_DATA is not set")
