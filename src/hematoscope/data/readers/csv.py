"""``csv``: a table with ``path`` and ``label`` columns (optional ``patient``; extra columns kept).

Relative paths are resolved against the CSV file's folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from hematoscope.data.readers import DatasetError, register_reader
from hematoscope.data.samples import make_table

#: Columns the reader computes itself; values for them in the file are ignored.
_DERIVED = ("canonical", "dataset")


def _is_csv(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".csv"


@register_reader("csv", detect=_is_csv)
def read_csv(path: Path):
    """A CSV with path,label[,patient] columns; relative paths are relative to the CSV."""
    import pandas as pd

    path = Path(path)
    if not _is_csv(path):
        if path.suffix.lower() == ".zip":
            raise DatasetError(f"{path} is a zip file: datasets are read from a folder or a .csv file, not from "
                               "inside a zip; unzip it and give the folder (`hematoscope predict` and "
                               "`hematoscope adapt` read zips as they are)")
        raise DatasetError(f"{path} is not a .csv file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot parse CSV ({exc})") from None
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise DatasetError(f"{path}: missing column(s) {sorted(missing)}; need path,label[,patient]")
    if df.empty:
        raise DatasetError(f"{path} has no rows")
    base = path.absolute().parent
    df["path"] = [os.path.normpath(p if os.path.isabs(p) else base / p) for p in df["path"]]
    df = df.drop(columns=[c for c in _DERIVED if c in df]).astype(object).where(df != "", None)
    return make_table(df.to_dict("records"), "csv")
