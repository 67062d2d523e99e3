"""A dataset is a table of samples: a pandas DataFrame with these columns, everywhere.

- ``path``: absolute path of the image file (str)
- ``label``: the label as the dataset spells it
- ``canonical``: the taxonomy name (``hematoscope.taxonomy``), or ``None`` when unmapped
- ``patient``: patient / slide id when the dataset has one, else ``None``
- ``dataset``: the reader name that produced the row
Split files add ``split`` (train / val / test or fold_k) and ``sha256``.

This module owns the table: how it is built (:func:`make_table`), read from whatever a caller
was given (:func:`hematoscope.data.readers.as_table`), which class each row belongs to (:func:`class_column`,
:func:`class_names`) and which rows belong together (:func:`resolve_group_by`,
:func:`group_keys`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

COLUMNS = ["path", "label", "canonical", "patient", "dataset"]


class DatasetError(ValueError):
    """A dataset path is missing, has the wrong layout, or no reader fits it."""


def make_table(rows: Iterable[Mapping], dataset: str):
    """Build a samples DataFrame from dicts with at least ``path`` and ``label``; fills
    ``canonical`` through the taxonomy and ``dataset``; rows are sorted by path (stable order)."""
    import pandas as pd

    from hematoscope.taxonomy import TAXONOMY

    rows = list(rows)
    _require_text_paths(rows)
    df = pd.DataFrame(rows, columns=None)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS).astype(object)
    for col in ("patient",):
        if col not in df:
            df[col] = None
    df["path"] = df["path"].astype(str)
    df["label"] = df["label"].astype(str)
    df["dataset"] = dataset
    df["canonical"] = [TAXONOMY.canonical(dataset, lab) for lab in df["label"]]
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    df = df.astype({"canonical": object, "patient": object})
    df = df.where(df.notna(), None)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _require_text_paths(rows: list[Mapping]) -> None:
    """Refuse file names that are not text (undecodable bytes): tables and reports carry names
    as UTF-8 text, so such a file could be neither listed nor reported."""
    from hematoscope.data.sources import shown_name, text_name

    bad = [shown_name(str(r["path"])) for r in rows if not text_name(str(r["path"]))]
    if bad:
        raise DatasetError(f"{len(bad)} file name(s) are not valid UTF-8 text, e.g. {', '.join(bad[:3])}: rename "
                           "them (an old Windows share or zip wrote them; predict passes over such files)")


def class_column(table: "pd.DataFrame") -> "np.ndarray":
    """Per row, the class it belongs to: the canonical taxonomy name where the taxonomy knows the
    label, else the dataset's own label (so unmapped classes stay distinct rather than merge)."""
    import numpy as np

    labels = table["label"].astype(str).to_numpy(dtype=object)
    if "canonical" not in table:
        return labels
    canon = table["canonical"].to_numpy(dtype=object)
    return np.array([c if isinstance(c, str) and c else lab for c, lab in zip(canon, labels)], dtype=object)


def has_label(table: "pd.DataFrame") -> "np.ndarray":
    """Per row, whether it has a label (a lab's unlabelled crops in a CSV have none: blank or
    missing)."""
    labels = table["label"]
    return (labels.notna() & (labels.astype(str).str.strip() != "")).to_numpy()


def require_labels(table: "pd.DataFrame", purpose: str) -> None:
    """Raise :class:`DatasetError` when rows of ``table`` have no label, which ``purpose``
    (e.g. "training") needs on every image."""
    missing = ~has_label(table)
    if missing.any():
        example = table["path"].to_numpy()[missing][0]
        raise DatasetError(f"{int(missing.sum())} of {len(table)} images have no label (e.g. {example}); {purpose} "
                           "needs one on every image (fewshot fit takes unlabelled rows as unlabelled crops)")


def class_names(table: "pd.DataFrame") -> list[str]:
    """The table's classes (:func:`class_column`), sorted: a model's output order."""
    return sorted(set(class_column(table).tolist()))


def resolve_group_by(table: "pd.DataFrame", group_by: str | None = "auto") -> str | None:
    """The column that groups ``table``'s rows, or None.

    ``"auto"``: ``"patient"`` when that column has at least one id, else None. ``None`` or
    ``"none"``: no grouping. Any other name must be a column of the table.

    Raises:
        ValueError: a named column that the table does not have.
    """
    if group_by is None or str(group_by).lower() == "none":
        return None
    if group_by == "auto":
        return "patient" if "patient" in table and table["patient"].notna().any() else None
    if group_by not in table:
        # readers put a dataset's own ids (LISC's cell groups, a lab's patient ids) in "patient"
        hint = (f"; this data's ids ({table['patient'].nunique()} of them) are in 'patient': --group-by patient, "
                "or auto" if "patient" in table and table["patient"].notna().any() else "")
        raise ValueError(f"cannot group by {group_by!r}: no such column (columns: {list(table.columns)}){hint}")
    return group_by


def group_keys(table: "pd.DataFrame", group_by: str | None) -> "np.ndarray | None":
    """Per row a group key: ``dataset|id`` (ids of different datasets never collide); a row
    without an id is its own group (keyed by its path). None when ``group_by`` is None."""
    import numpy as np
    import pandas as pd

    if group_by is None:
        return None
    ds = table["dataset"] if "dataset" in table else pd.Series([""] * len(table), index=table.index)
    return np.array([f"row:{p}" if pd.isna(g) else f"id:{d}|{g}"
                     for g, d, p in zip(table[group_by], ds, table["path"])], dtype=object)
