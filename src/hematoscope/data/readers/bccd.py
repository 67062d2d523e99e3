"""``bccd``: cropped white-cell images derived from BCCD (e.g. Kaggle "Blood Cell Images").

Class folders ``EOSINOPHIL LYMPHOCYTE MONOCYTE NEUTROPHIL`` (``BASOPHIL`` when present; detected
by these upper-case names, read in any letter case with ``--reader bccd``), either directly in the root or under subset folders such as ``TRAIN``, ``TEST``,
``TEST_SIMPLE`` (up to ``dataset2-master/images/TRAIN``); the subset is kept in a ``subset``
column. Note that the Kaggle release contains offline-augmented copies of each crop: near
duplicates that must not cross a split (see ``hematoscope data check``).
"""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.readers.folder import class_folder_rows, class_folders, require_rows
from hematoscope.data.samples import make_table

BCCD_CLASSES = ("BASOPHIL", "EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")


def _is_class_level(folder: Path, exact_case: bool = False) -> bool:
    names = {d.name if exact_case else d.name.upper() for d in class_folders(folder)}
    return len(names & set(BCCD_CLASSES)) >= 3 and names <= set(BCCD_CLASSES)


def _subset_dirs(root: Path, exact_case: bool = False) -> list[Path]:
    """Folders whose children are the class folders: the root itself or subsets below it."""
    if _is_class_level(root, exact_case):
        return [root]
    for pattern in ("*", "*/*", "*/*/*"):
        found = sorted(p for p in root.glob(pattern) if p.is_dir() and _is_class_level(p, exact_case))
        if found:
            return found
    return []


def _detect(root: Path) -> bool:
    # BCCD's own upper-case folder names: a lab's `basophil/ ... neutrophil/` tree is any lab's
    # class folders (the `folder` reader), not BCCD; `--reader bccd` takes any letter case
    return root.is_dir() and bool(_subset_dirs(root, exact_case=True))


@register_reader("bccd", detect=_detect)
def read_bccd(root: Path):
    """BCCD crops: EOSINOPHIL LYMPHOCYTE MONOCYTE NEUTROPHIL folders, optionally under TRAIN/TEST."""
    root = Path(root)
    subsets = _subset_dirs(root)
    if not subsets:
        raise DatasetError(f"{root} is not a BCCD crop folder (expected {', '.join(BCCD_CLASSES)} folders)")
    rows = [r for s in subsets for r in class_folder_rows(s, subset=None if s == root else s.name)]
    return make_table(require_rows(rows, root, "[TRAIN|TEST/]<CLASS>/<image>.jpeg"), "bccd")
