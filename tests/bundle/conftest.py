"""Another lab's cells for the bundle tests: a few LISC crops per white-cell class."""
from __future__ import annotations

from pathlib import Path

import pytest

WHITE = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture(scope="session")
def lisc_files(lisc_root) -> list[Path]:
    """Six crops per class of the other lab: about half of them look unlike PBC to the model."""
    return [p for c in WHITE for p in sorted((lisc_root / c).glob("*.jpg"))[:6]]


@pytest.fixture
def lisc_folder(lisc_files, tmp_path) -> Path:
    """:func:`lisc_files` as a labelled dataset folder (class subfolders of links), for ``evaluate``."""
    data = tmp_path / "cells"
    for f in lisc_files:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        (data / f.parent.name / f.name).symlink_to(f)
    return data
