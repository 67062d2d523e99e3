"""Where hematoscope keeps caches and user data (never inside an input data folder)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$HEMATOSCOPE_CACHE`` or the platform user cache dir, with ``parts`` appended (created)."""
    root = os.environ.get("HEMATOSCOPE_CACHE")
    if not root:
        from platformdirs import user_cache_dir

        root = user_cache_dir("hematoscope")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(*parts: str) -> Path:
    """``$HEMATOSCOPE_HOME`` or the platform user data dir (history database, settings)."""
    root = os.environ.get("HEMATOSCOPE_HOME")
    if not root:
        from platformdirs import user_data_dir

        root = user_data_dir("hematoscope")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_root(explicit: Path | str | None = None) -> Path:
    """An explicit data root, else ``$HEMATOSCOPE_DATA``; raise a clear error when neither is set."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("HEMATOSCOPE_DATA")
    if env:
        return Path(env)
    raise FileNotFoundError("no data path given and $HEMATOSCOPE_DATA is not set")
