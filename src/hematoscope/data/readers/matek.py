"""``matek``: AML-Cytomorphology_LMU (Matek et al. 2019, TCIA), 15 folders named by abbreviation.

Published as ``AML-Cytomorphology_LMU/<ABBR>/<ABBR>_<n>.tiff``; the reader accepts that folder or
its parent. No patient ids are published with the images.
"""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.readers.folder import class_folder_rows, class_folders, require_rows
from hematoscope.data.samples import make_table

MATEK_CLASSES = ("BAS", "EBO", "EOS", "KSC", "LYA", "LYT", "MMZ", "MOB", "MON", "MYB", "MYO", "NGB", "NGS", "PMB", "PMO")


def _matek_root(root: Path) -> Path | None:
    for candidate in (root, root / "AML-Cytomorphology_LMU"):
        names = {d.name for d in class_folders(candidate)}
        if len(names & set(MATEK_CLASSES)) >= 5 and names <= set(MATEK_CLASSES):
            return candidate
    return None


def _detect(root: Path) -> bool:
    return root.is_dir() and _matek_root(root) is not None


@register_reader("matek", detect=_detect)
def read_matek(root: Path):
    """AML-Cytomorphology_LMU (Matek 2019): folders BAS EBO EOS ... PMO with .tiff images."""
    root = Path(root)
    found = _matek_root(root)
    if found is None:
        raise DatasetError(f"{root} is not an AML-Cytomorphology_LMU folder (expected sub-folders {', '.join(MATEK_CLASSES)})")
    return make_table(require_rows(class_folder_rows(found), root, "AML-Cytomorphology_LMU/<ABBR>/<ABBR>_<n>.tiff"), "matek")
