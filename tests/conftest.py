"""Shared fixtures. Each tests/<package>/conftest.py adds its own; fixtures used by several
packages live here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The real PBC images (read-only); tests that need them skip when this folder is absent.
PBC_ROOT = Path(os.environ.get("HEMATOSCOPE_PBC", Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"))


def pytest_configure(config):
    # Tests never write into the user's cache or data dirs.
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="hematoscope-tests-"))
    os.environ.setdefault("HEMATOSCOPE_CACHE", str(base / "cache"))
    os.environ.setdefault("HEMATOSCOPE_HOME", str(base / "home"))
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def pbc_root() -> Path:
    if not (PBC_ROOT / "basophil").is_dir():
        pytest.skip(f"real PBC images not found at {PBC_ROOT} (set HEMATOSCOPE_PBC to their folder)")
    return PBC_ROOT


@pytest.fixture(scope="session")
def pbc_subset(pbc_root, tmp_path_factory) -> Path:
    """A small real-PBC class-per-folder tree (symlinks: 6 images per class), for fast tests."""
    out = tmp_path_factory.mktemp("pbc_subset")
    for cls_dir in sorted(p for p in pbc_root.iterdir() if p.is_dir()):
        files = sorted(f for f in cls_dir.iterdir() if f.suffix == ".jpg" and not f.name.startswith("."))[:6]
        (out / cls_dir.name).mkdir()
        for f in files:
            (out / cls_dir.name / f.name).symlink_to(f)
    return out
