"""A few real PBC cell images shipped with the package, so a fresh install has real cells to try.

Three images per class from the PBC dataset (Acevedo et al. 2020, CC BY 4.0; see
``pbc/README.md``), in the dataset's own class-per-folder layout.
"""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.images import is_image_file


def samples_dir() -> Path:
    """The folder of bundled PBC samples: ``pbc/<class>/<original file name>.jpg``."""
    return Path(__file__).resolve().parent / "pbc"


def sample_paths() -> list[Path]:
    """All bundled sample images, sorted by class then file name."""
    return sorted(p for p in samples_dir().glob("*/*") if p.is_file() and is_image_file(p))
