"""``raabin``: Raabin-WBC (Kouzehkanan et al. 2022), cropped cells in ``Train/`` and ``TestA/``.

Each subset folder holds ``Basophil Eosinophil Lymphocyte Monocyte Neutrophil``; the subset
(``Train``, ``TestA``, and ``TestB`` when present) is kept in a ``subset`` column.
"""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.readers.folder import class_folder_rows, class_folders, require_rows
from hematoscope.data.samples import make_table

RAABIN_SUBSETS = ("Train", "TestA", "TestB")
RAABIN_CLASSES = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")


def _subsets(root: Path) -> list[Path]:
    return [root / s for s in RAABIN_SUBSETS
            if {d.name for d in class_folders(root / s)} & set(RAABIN_CLASSES)]


def _detect(root: Path) -> bool:
    return root.is_dir() and bool(_subsets(root))


@register_reader("raabin", detect=_detect)
def read_raabin(root: Path):
    """Raabin-WBC: Train/ TestA/ (TestB/) each with Basophil Eosinophil Lymphocyte Monocyte Neutrophil."""
    root = Path(root)
    subsets = _subsets(root)
    if not subsets:
        raise DatasetError(f"{root} is not a Raabin-WBC folder (expected Train/ and TestA/ with {', '.join(RAABIN_CLASSES)})")
    rows = [r for s in subsets for r in class_folder_rows(s, subset=s.name)]
    return make_table(require_rows(rows, root, "Train|TestA/<Class>/<image>.jpg"), "raabin")
