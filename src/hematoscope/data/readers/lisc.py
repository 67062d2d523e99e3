"""``lisc``: LISC white-cell crops (Rezatofighi & Soltanian-Zadeh 2011), a validation lab.

Layout: five class folders (``basophil eosinophil lymphocyte monocyte neutrophil``) of crops,
plus ``groups.csv`` with the columns ``path,label,group`` (``path`` relative to the root). Several
crops show the same cell; ``groups.csv`` gives them one group, which the reader puts in the
``patient`` column, so grouped splits (``hematoscope data split --group-by patient``) and
few-label draws (``hematoscope fewshot bench``) keep one cell's crops on one side. A crop missing
from ``groups.csv`` gets no group (it counts as its own group).
"""
from __future__ import annotations

import csv
from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.readers.folder import (GROUPS_FILE, attach_groups, class_folder_rows, class_folders, read_groups,
                                             require_rows)
from hematoscope.data.samples import make_table

LISC_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
GROUPS_COLUMNS = ("path", "label", "group")


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError):
        return []


def _detect(root: Path) -> bool:
    if not (root.is_dir() and (root / GROUPS_FILE).is_file()):
        return False
    names = {d.name for d in class_folders(root)}
    return len(names & set(LISC_CLASSES)) >= 3 and names <= set(LISC_CLASSES) \
        and set(GROUPS_COLUMNS) <= set(_header(root / GROUPS_FILE))


@register_reader("lisc", detect=_detect)
def read_lisc(root: Path):
    """LISC crops: basophil eosinophil lymphocyte monocyte neutrophil folders + groups.csv (cell → patient)."""
    root = Path(root)
    if not _detect(root):
        raise DatasetError(f"{root} is not a LISC crops folder (expected sub-folders among {', '.join(LISC_CLASSES)} "
                           f"and {GROUPS_FILE} with columns {','.join(GROUPS_COLUMNS)})")
    groups = read_groups(root / GROUPS_FILE)
    rows = require_rows(class_folder_rows(root), root, "<class>/<image>.jpg + groups.csv")
    return make_table(attach_groups(rows, root, groups), "lisc")
