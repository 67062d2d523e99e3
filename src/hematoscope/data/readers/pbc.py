"""``pbc``: PBC dataset (Acevedo et al. 2020), eight class folders.

Published as ``PBC_dataset_normal_DIB/<class>/<PREFIX>_<id>.jpg``; the reader accepts that folder
or its parent. The file-name prefix (e.g. ``SNE``/``BNE`` for segmented/band neutrophils,
``PMY``/``MY``/``MMY`` inside ``ig``) is kept in a ``subtype`` column.
"""
from __future__ import annotations

import re
from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.readers.folder import class_folder_rows, class_folders, require_rows
from hematoscope.data.samples import make_table

PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
_PREFIX = re.compile(r"^([A-Za-z]+)_")


def _pbc_root(root: Path) -> Path | None:
    for candidate in (root, root / "PBC_dataset_normal_DIB"):
        names = {d.name for d in class_folders(candidate)}
        if len(names & set(PBC_CLASSES)) >= 6 and names <= set(PBC_CLASSES):
            return candidate
    return None


def _detect(root: Path) -> bool:
    return root.is_dir() and _pbc_root(root) is not None


@register_reader("pbc", detect=_detect)
def read_pbc(root: Path):
    """PBC (Acevedo 2020): basophil eosinophil erythroblast ig lymphocyte monocyte neutrophil platelet."""
    root = Path(root)
    found = _pbc_root(root)
    if found is None:
        raise DatasetError(f"{root} is not a PBC folder (expected sub-folders {', '.join(PBC_CLASSES)})")
    rows = require_rows(class_folder_rows(found), root, "PBC_dataset_normal_DIB/<class>/<image>.jpg")
    for row in rows:
        m = _PREFIX.match(Path(row["path"]).name)
        row["subtype"] = m.group(1).upper() if m else None
    return make_table(rows, "pbc")
