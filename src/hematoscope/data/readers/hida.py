"""``hida``: the Helmholtz HIDA data challenge "Help a Hematologist Out" (2022).

The challenge shipped ``Acevedo_20.zip`` and ``Matek_19.zip``, unpacked side by side (e.g. into
``Datasets/``), each relabelled into common class folders: ``basophil eosinophil erythroblast
myeloblast promyelocyte myelocyte metamyelocyte neutrophil_banded neutrophil_segmented monocyte
lymphocyte_typical``. The source dataset is kept in a ``source`` column. The unlabelled target
domain (``WBC1/``, ``WBC2/``) is not read: it has no labels.
"""
from __future__ import annotations

from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.readers.folder import class_folder_rows, require_rows
from hematoscope.data.samples import make_table

HIDA_SOURCES = ("Acevedo_20", "Matek_19")


def _sources(root: Path) -> list[Path]:
    return [root / s for s in HIDA_SOURCES if (root / s).is_dir()]


def _detect(root: Path) -> bool:
    return root.is_dir() and bool(_sources(root))


@register_reader("hida", detect=_detect)
def read_hida(root: Path):
    """HIDA challenge 2022: Acevedo_20/ and Matek_19/ with 11 common class folders."""
    root = Path(root)
    sources = _sources(root)
    if not sources:
        raise DatasetError(f"{root} is not a HIDA challenge folder (expected {' and/or '.join(HIDA_SOURCES)})")
    rows = [r for s in sources for r in class_folder_rows(s, source=s.name)]
    return make_table(require_rows(rows, root, "Acevedo_20|Matek_19/<class>/<image>"), "hida")
