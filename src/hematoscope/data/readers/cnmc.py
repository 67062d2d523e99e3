"""``cnmc``: C-NMC 2019 (ISBI challenge on B-ALL, Gupta & Gupta 2019), training folds.

Published as ``C-NMC_Leukemia/training_data/fold_{0,1,2}/{all,hem}/UID_<patient>_<image>_<cell>_<all|hem>.bmp``;
the reader accepts any folder holding the ``fold_*`` folders, up to two levels above them.
Patient ids come from the file names (``UID_11_10_1_all.bmp`` → ``11``,
``UID_H10_43_1_hem.bmp`` → ``H10``), so grouped splits never put one patient on two sides.
The fold is kept in a ``fold`` column.
"""
from __future__ import annotations

import re
from pathlib import Path

from hematoscope.data.images import is_image_file
from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.readers.folder import require_rows
from hematoscope.data.samples import make_table

_FOLD = re.compile(r"^fold_\d+$")
_UID = re.compile(r"^UID_([A-Za-z]*\d+)_", re.IGNORECASE)


def parse_patient(filename: str) -> str | None:
    """The patient id in a C-NMC file name, or None when the name does not follow the scheme."""
    m = _UID.match(filename)
    return m.group(1) if m else None


def _fold_dirs(root: Path) -> list[Path]:
    for pattern in ("fold_*", "*/fold_*", "*/*/fold_*"):
        folds = sorted(p for p in root.glob(pattern) if p.is_dir() and _FOLD.match(p.name)
                       and ((p / "all").is_dir() or (p / "hem").is_dir()))
        if folds:
            return folds
    return []


def _detect(root: Path) -> bool:
    return root.is_dir() and bool(_fold_dirs(root))


@register_reader("cnmc", detect=_detect)
def read_cnmc(root: Path):
    """C-NMC 2019: fold_0..2/{all,hem}/UID_<patient>_..._{all,hem}.bmp, patient ids from names."""
    root = Path(root)
    folds = _fold_dirs(root)
    if not folds:
        raise DatasetError(f"{root} is not a C-NMC 2019 folder (expected fold_0/all, fold_0/hem, ...)")
    rows = []
    for fold in folds:
        for label in ("all", "hem"):
            for f in sorted((fold / label).glob("*")):
                if f.is_file() and is_image_file(f):
                    rows.append({"path": str(f.resolve()), "label": label,
                                 "patient": parse_patient(f.name), "fold": fold.name})
    return make_table(require_rows(rows, root, "fold_k/{all,hem}/UID_*.bmp"), "cnmc")
