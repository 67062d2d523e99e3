"""A dataset is a table of samples: a pandas DataFrame with these columns, everywhere.

- ``path``: absolute path of the image file (str)
- ``label``: the label as the dataset spells it
- ``canonical``: the taxonomy name (``hematoscope.taxonomy``), or ``None`` when unmapped
- ``patient``: patient / slide id when the dataset has one, else ``None``
- ``dataset``: the reader name that produced the row
Split files add ``split`` (train / val / test or fold_k) and ``sha256``.
"""
from __future__ import annotations

from typing import Iterable, Mapping

COLUMNS = ["path", "label", "canonical", "patient", "dataset"]


def make_table(rows: Iterable[Mapping], dataset: str):
    """Build a samples DataFrame from dicts with at least ``path`` and ``label``; fills
    ``canonical`` through the taxonomy and ``dataset``; rows are sorted by path (stable order)."""
    import pandas as pd

    from hematoscope.taxonomy import TAXONOMY

    df = pd.DataFrame(list(rows), columns=None)
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
