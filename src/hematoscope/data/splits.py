"""Reproducible train/val/test and k-fold splits, saved as CSV files that pin each file's content.

A split file is a samples table (:mod:`hematoscope.data.samples`) plus two columns:

- ``split``: ``train`` / ``val`` / ``test``, or ``fold_0`` .. ``fold_{k-1}``;
- ``sha256``: the file's content hash when the split was saved, so a later run detects changed
  or missing files instead of silently training on different data.

Paths are stored relative to the split file's folder when the image lies inside that folder,
otherwise absolute; :func:`load_split` always returns absolute paths. Rows are sorted by path and
the CSV is written with fixed formatting, so the same table and seed give a byte-identical file.
"""
from __future__ import annotations

import csv
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hematoscope._io import file_sha256
from hematoscope.data import samples
from hematoscope.data.samples import COLUMNS, DatasetError

SPLIT_COLUMNS = COLUMNS + ["split", "sha256"]


class SplitIntegrityError(DatasetError):
    """Files listed in a split file are missing or their content changed since it was saved."""

    def __init__(self, path: Path, missing: list[str], changed: list[str]):
        self.missing, self.changed = missing, changed
        parts = []
        for what, items in (("missing", missing), ("changed", changed)):
            if items:
                shown = "\n  ".join(items[:10]) + (f"\n  ... and {len(items) - 10} more" if len(items) > 10 else "")
                parts.append(f"{len(items)} file(s) {what}:\n  {shown}")
        super().__init__(f"split file {path} no longer matches the data; " + "; ".join(parts)
                         + "\n(re-create the split: hematoscope data split DATA --out FILE; from Python, "
                         "load_split(path, verify=False) reads it as it is)")


@dataclass
class SplitCheck:
    """Result of :func:`verify_split`: paths (absolute) that are missing or changed."""

    missing: list[str]
    changed: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.changed


def make_split(table, *, val: float = 0.1, test: float = 0.1, seed: int = 0, group_by: str | None = None):
    """Add a ``split`` column (train / val / test), stratified by label.

    Without grouping each class is split on its own: ``round(n * test)`` test and
    ``round(n * val)`` val images (at least one each when the class has 3 or more images and the
    fraction is non-zero), the rest train. With ``group_by`` (e.g. ``"patient"``) whole groups are
    assigned with scikit-learn's ``StratifiedGroupKFold``, so no group lands on two sides; the
    fractions are then approximate (one fold of ``round(1 / test)`` folds is the test part, and so
    on). Rows without a group id count as their own group. When no row has a group id the split
    is ungrouped (with a warning).

    Args:
        table: samples DataFrame (``path``, ``label`` columns at least).
        val: fraction for validation.
        test: fraction for test.
        seed: random seed; the result depends only on the table's content and the seed, not on
            its row order.
        group_by: column with group ids (patient / slide), or None.

    Returns:
        A copy of ``table`` sorted by path, with a ``split`` column.

    Raises:
        ValueError: bad fractions, a missing ``group_by`` column, or too few groups.
    """
    import numpy as np

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"need 0 <= val, test and val + test < 1; got val={val}, test={test}")
    df = _sorted_copy(table)
    groups = _groups(df, group_by)
    split = np.full(len(df), "train", dtype=object)
    if groups is None:
        rng = np.random.default_rng(seed)
        for label in sorted(df["label"].unique()):
            idx = rng.permutation(np.flatnonzero(df["label"].to_numpy() == label))
            n_test, n_val = _class_counts(len(idx), val, test)
            split[idx[:n_test]] = "test"
            split[idx[n_test:n_test + n_val]] = "val"
    else:
        remaining = np.arange(len(df))
        for name, frac in (("test", test), ("val", val / (1 - test))):
            if frac <= 0:
                continue
            pick = _one_group_fold(df["label"].to_numpy()[remaining], groups[remaining], frac, seed)
            split[remaining[pick]] = name
            remaining = remaining[~pick]
    df["split"] = split
    wanted = [part for part, frac in (("val", val), ("test", test)) if frac > 0]
    _warn_missing_classes(df, wanted, "part")
    return df


def _warn_missing_classes(df, parts: list[str], what: str) -> None:
    """Warn about classes absent from some of ``parts`` (too few images or groups to share out):
    such a class is never validated or tested there, which a user should hear of."""
    missing = {}
    for label, rows in df.groupby("label")["split"]:
        lacking = [p for p in parts if p not in set(rows)]
        if lacking:
            missing[label] = (len(rows), lacking)
    if missing:
        listed = "; ".join(f"{lab} ({n} image{'s' * (n != 1)}: none in {', '.join(lack)})"
                           for lab, (n, lack) in sorted(missing.items()))
        warnings.warn(f"{len(missing)} class{'es' * (len(missing) != 1)} too small to be in every {what}: {listed}",
                      UserWarning, stacklevel=3)


def kfold_split(table, k: int = 5, seed: int = 0, group_by: str | None = None):
    """Add a ``split`` column ``fold_0`` .. ``fold_{k-1}``: stratified k-fold (scikit-learn's
    ``StratifiedKFold``, or ``StratifiedGroupKFold`` when ``group_by`` has ids).

    Raises:
        ValueError: ``k < 2``, or more folds than images (or groups) allow.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    df = _sorted_copy(table)
    groups = _groups(df, group_by)
    labels = df["label"].to_numpy()
    n_units = len(df) if groups is None else len(set(groups))
    if k > n_units:
        raise ValueError(f"cannot make {k} folds from {n_units} {'images' if groups is None else 'groups'}")
    largest = df["label"].value_counts()
    if groups is None and k > int(largest.max()):  # scikit-learn's own words name n_splits, not --kfold
        raise ValueError(f"cannot make {k} stratified folds: the largest class ({largest.index[0]}) has "
                         f"{int(largest.max())} images; use at most {int(largest.max())} folds")
    cv = (StratifiedKFold(k, shuffle=True, random_state=seed) if groups is None
          else StratifiedGroupKFold(k, shuffle=True, random_state=seed))
    fold = np.empty(len(df), dtype=object)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for i, (_, test_idx) in enumerate(cv.split(np.zeros(len(df)), labels, groups)):
            fold[test_idx] = f"fold_{i}"
    df["split"] = fold
    _warn_missing_classes(df, [f"fold_{i}" for i in range(k)], "fold")
    return df


def duplicate_clusters(report: dict) -> list[list[str]]:
    """Clusters of paths that are copies of one image, from a ``data check --json`` report: its
    byte-identical groups and near-duplicate pairs, joined where they share a file."""
    links = [d["paths"] for d in report.get("exact_duplicates", [])]
    links += [[d["a"], d["b"]] for d in report.get("near_duplicates", [])]
    clusters: dict[str, list[str]] = {}
    for p, rep in _components([os.path.abspath(p) for p in paths] for paths in links).items():
        clusters.setdefault(rep, []).append(p)
    return sorted(sorted(c) for c in clusters.values() if len(c) > 1)


def _components(links) -> dict[str, str]:
    """Each key named in ``links`` (sequences of keys that belong together) mapped to its
    connected component's representative, the smallest key of the component."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for keys in links:
        keys = list(keys)
        for k in keys[1:]:
            a, b = sorted((root(keys[0]), root(k)))
            parent[b] = a
    return {k: root(k) for k in list(parent)}


def check_report_mismatch(report: dict, table, source: Path | str) -> str | None:
    """Why a ``data check --json`` ``report`` is not a report of the data in ``table`` (read from
    ``source``), or None when it may be.

    It is of other data when files it names (unreadable, duplicates, edge bars) are not in the
    table, or when it was made on another path (its ``source``) and counted another number of
    files. The same images read another way (a split file of the checked folder) pass.
    """
    have = {os.path.abspath(p) for p in table["path"]}
    named = [u["path"] for u in report.get("unreadable", [])]
    named += [p for d in report.get("exact_duplicates", []) for p in d["paths"]]
    named += [p for d in report.get("near_duplicates", []) for p in (d["a"], d["b"])]
    named += list(report.get("edge_bars", [])) + list(report.get("blank", []))
    foreign = [p for p in named if os.path.abspath(p) not in have]
    if foreign:
        n = len(set(foreign))
        return f"{n} file{'s' if n != 1 else ''} it names {'are' if n != 1 else 'is'} not in {source} " \
               f"(e.g. {sorted(foreign)[0]})"
    checked = report.get("source")
    counted = report.get("n_files", report.get("summary", {}).get("files"))
    same_path = checked not in (None, "<table>") and os.path.abspath(checked) == os.path.abspath(source)
    if not same_path and counted is not None and counted != len(table):
        return f"it counted {counted} files, {source} has {len(table)}"
    return None


def unreadable_files(paths, *, workers: int = 2) -> dict[str, str]:
    """The files of ``paths`` that are no usable image, with the reason, from
    :func:`~hematoscope.data.images.probe_image`'s cheap look (header and end of each file;
    about half a second for PBC's 13,726 files). ``hematoscope data check`` decodes every file."""
    from hematoscope.data.images import probe_image

    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(probe_image, paths, chunksize=64))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def split_keeping_together(table, clusters: list[list[str]], *, group_by: str | None = None, kfold: int | None = None,
                           **split_kwargs):
    """:func:`make_split` (or :func:`kfold_split` with ``kfold``) with every cluster of
    ``clusters`` (paths of copies of one image, :func:`duplicate_clusters`) on one side, so
    a copy of a training image is never a test image.

    With ``group_by`` the groups that share a cluster are merged before splitting (the same
    cell under two ids stays whole); without, each cluster that the split spread is moved to
    the part most of it is in (train first on a tie).

    Returns:
        (the split table, the number of images moved or groups merged).
    """
    paths = [os.path.abspath(p) for p in table["path"]]
    cluster_of = {p: i for i, c in enumerate(clusters) for p in c}
    split = (lambda t, g: kfold_split(t, k=kfold, group_by=g, **split_kwargs)) if kfold else \
        (lambda t, g: make_split(t, group_by=g, **split_kwargs))
    groups = _groups(table, group_by)
    if groups is not None:
        members: dict[int, list[str]] = {}
        for g, p in zip(groups, paths):
            if p in cluster_of:
                members.setdefault(cluster_of[p], []).append(str(g))
        merged = _components(members.values())
        n = sum(rep != k for k, rep in merged.items())
        t = table.assign(_together=[merged.get(str(g), str(g)) for g in groups])
        return split(t, "_together").drop(columns="_together"), n
    df = split(table, None)
    where = {os.path.abspath(p): i for i, p in enumerate(df["path"])}
    order = {part: k for k, part in enumerate(["train", "val", "test"] + [f"fold_{i}" for i in range(kfold or 0)])}
    parts = df["split"].to_numpy(dtype=object)
    moved = 0
    for c in clusters:
        rows = [where[p] for p in c if p in where]
        sides = [parts[r] for r in rows]
        if len(set(sides)) > 1:
            counts = {s: sides.count(s) for s in set(sides)}
            keep = min(counts, key=lambda s: (-counts[s], order.get(s, 99)))
            moved += sum(s != keep for s in sides)
            parts[rows] = keep
    df["split"] = parts
    return df, moved


def train_val_rows(table, *, fold: int | None = None):
    """The rows of a split table that train (``train``) and validate (``val``) a model: as they
    are, or for a k-fold split file (``fold_0`` ..), ``fold_<fold>`` as val and the other folds
    as train. None when the table has no ``split`` column (the caller splits it).

    Raises:
        ValueError: a k-fold table without ``fold``, ``fold`` on a table without folds or out of
            range, or no train / val rows.
    """
    if "split" not in table:
        if fold is not None:
            raise ValueError("--fold needs a k-fold split file (hematoscope data split --kfold K)")
        return None
    parts = set(table["split"])
    folds = sorted(p for p in parts if str(p).startswith("fold_"))
    if folds:
        if fold is None:
            raise ValueError(f"a k-fold split file ({', '.join(folds)}): pick the fold that validates with --fold "
                             f"0..{len(folds) - 1} (the others train)")
        if f"fold_{fold}" not in parts:
            raise ValueError(f"no fold_{fold} in this split file (folds: {', '.join(folds)})")
        return table.assign(split=["val" if p == f"fold_{fold}" else "train" for p in table["split"]])
    if fold is not None:
        raise ValueError(f"--fold needs a k-fold split file; this one has {', '.join(sorted(map(str, parts)))}")
    rows = table[table["split"].isin(["train", "val"])]
    if not {"train", "val"} <= set(rows["split"]):
        raise ValueError(f"a split file to train from needs train and val rows; it has {', '.join(sorted(map(str, parts)))}")
    return rows.reset_index(drop=True)


#: ``--split`` value that keeps every row.
ALL_ROWS = "all"


class SplitRowsError(ValueError):
    """The ``--split`` choice does not fit the data; the CLI shows it as a bad ``--split`` value."""

    param_hint = "--split"


def select_split_rows(table: "pd.DataFrame", split: str | None, data: Path | str) -> tuple["pd.DataFrame", str | None]:
    """The rows of ``table`` to score and the name of the choice.

    A table without a ``split`` column (a dataset folder) is scored whole: ``(table, None)``.
    A split table gives its ``test`` rows by default; ``split`` names another part (``val``,
    ``train``, ``fold_0`` ...) or ``all``.

    Args:
        table: samples table, e.g. from :func:`hematoscope.data.readers.read_dataset`.
        split: the ``--split`` value, or None for the default.
        data: what the table was read from, for the messages.

    Returns:
        (the chosen rows, index reset; the part chosen — ``"test"``, the named part, ``"all"`` —
        or None when the table has no ``split`` column).

    Raises:
        SplitRowsError: no ``split`` given and the table has no test rows (e.g. a training run's
            ``split.csv``), or the named part has no rows.
    """
    if "split" not in table:
        return table, None
    parts = sorted({str(p) for p in table["split"]})
    if split is None and "test" not in parts:
        # e.g. a training run's split.csv (its rows trained or tuned the model) or a k-fold file
        raise SplitRowsError(f"{data} has no test rows (its parts: {', '.join(parts)}); name the rows to score: "
                             f"--split {'val' if 'val' in parts else parts[-1]}, or --split {ALL_ROWS}")
    chosen = split or "test"
    if chosen != ALL_ROWS:
        table = table[table["split"] == chosen].reset_index(drop=True)
        if table.empty:
            raise SplitRowsError(f"{data} has no rows with split {chosen!r} (its parts: {', '.join(parts)}, "
                                 f"or {ALL_ROWS})")
    return table, chosen


def save_split(df, path: Path | str) -> Path:
    """Write ``df`` (with a ``split`` column) as a split CSV, hashing every file (atomic write).

    Raises:
        ValueError: no ``split`` column.
        DatasetError: an image file is missing.
    """
    from hematoscope._io import write_text

    if "split" not in df:
        raise ValueError("table has no 'split' column; make one with make_split or kfold_split")
    path = Path(path)
    base = path.absolute().parent
    out = _sorted_copy(df)
    missing = [p for p in out["path"] if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{len(missing)} file(s) in the table do not exist, e.g. {missing[0]}")
    out["sha256"] = hash_files(list(out["path"]))
    out["path"] = [_portable_path(p, base) for p in out["path"]]
    cols = SPLIT_COLUMNS + [c for c in out.columns if c not in SPLIT_COLUMNS]
    return write_text(path, out[cols].to_csv(index=False, lineterminator="\n"))


def load_split(path: Path | str, verify: bool = True):
    """Read a split CSV written by :func:`save_split`; paths come back absolute.

    Args:
        path: the split file.
        verify: re-hash every file and raise when any is missing or changed.

    Raises:
        DatasetError: not a split file.
        SplitIntegrityError: (``verify``) files missing or changed since the split was saved.
    """
    import pandas as pd

    path = Path(path)
    if not is_split_file(path):
        raise DatasetError(f"{path} is not a split file (a CSV with a 'split' column)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = df.astype(object).where(df != "", None)
    base = path.absolute().parent
    df["path"] = [os.path.normpath(p if os.path.isabs(p) else base / p) for p in df["path"]]
    if verify:
        check = verify_split(df)
        if not check.ok:
            raise SplitIntegrityError(path, check.missing, check.changed)
    return df


def verify_split(df) -> SplitCheck:
    """Compare each file of a loaded split table with its recorded ``sha256``."""
    exists = [os.path.isfile(p) for p in df["path"]]
    missing = [p for p, e in zip(df["path"], exists) if not e]
    present = [(p, h) for p, h, e in zip(df["path"], df["sha256"], exists) if e]
    hashes = hash_files([p for p, _ in present])
    changed = [p for (p, h), new in zip(present, hashes) if h is not None and h != new]
    return SplitCheck(missing, changed)


def is_split_file(path: Path | str) -> bool:
    """True for a readable ``.csv`` file whose header has a ``split`` column."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "split" in header


def hash_files(paths: list[str], *, unreadable_as_none: bool = False) -> list[str | None]:
    """The sha256 of each file; with ``unreadable_as_none``, None for a file that cannot be read
    (else its OSError is raised)."""
    def one(path: str) -> str | None:
        try:
            return file_sha256(path)
        except OSError:
            if unreadable_as_none:
                return None
            raise

    # hashlib releases the GIL, so two threads keep both cores busy on large datasets.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, paths, chunksize=64))


def _portable_path(p: str, base: Path) -> str:
    rel = os.path.relpath(p, base) if os.path.splitdrive(p)[0] == os.path.splitdrive(str(base))[0] else None
    if rel is None or rel == ".." or rel.startswith(".." + os.sep):
        return os.path.abspath(p)
    return Path(rel).as_posix()


def _sorted_copy(table):
    if "path" not in table or "label" not in table:
        raise ValueError("table needs 'path' and 'label' columns")
    if len(table) == 0:
        raise ValueError("table is empty")
    return table.sort_values("path", kind="stable").reset_index(drop=True).copy()


def _groups(df, group_by: str | None):
    import numpy as np
    import pandas as pd

    if group_by is None:
        return None
    if group_by not in df:
        raise ValueError(f"cannot group by {group_by!r}: no such column (columns: {list(df.columns)})")
    ids = df[group_by]
    if ids.isna().all():
        warnings.warn(f"no {group_by!r} ids in this table; splitting images, not groups", stacklevel=3)
        return None
    # Rows without an id are their own group: keyed by path, which never collides with an id.
    return np.array([f"row:{p}" if pd.isna(g) else f"id:{g}" for g, p in zip(ids, df["path"])])


def _class_counts(n: int, val: float, test: float) -> tuple[int, int]:
    """(n_test, n_val) for a class of n images; small classes still get one of each if possible."""
    n_test, n_val = round(n * test), round(n * val)
    if n >= 3:
        n_test = max(n_test, 1 if test > 0 else 0)
        n_val = max(n_val, 1 if val > 0 else 0)
    while n_test + n_val >= n and (n_test or n_val):  # keep at least one training image
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def _one_group_fold(labels, groups, frac: float, seed: int):
    """Boolean mask of one ``StratifiedGroupKFold`` fold holding about ``frac`` of the rows."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    k = max(2, round(1 / frac))
    if n_groups < k:
        raise ValueError(f"only {n_groups} groups: too few for a {frac:.0%} grouped split (need {k})")
    cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        _, idx = next(iter(cv.split(np.zeros(len(labels)), labels, groups)))
    mask = np.zeros(len(labels), dtype=bool)
    mask[idx] = True
    return mask


def split_parts(table) -> tuple[object, object | None]:
    """A split file's (pool, test) parts: train+val rows and test rows (None without test rows);
    a table without a ``split`` column is all pool."""
    if "split" not in table or not (table["split"] == "test").any():
        return table, None
    is_test = (table["split"] == "test").to_numpy()
    return table[~is_test].reset_index(drop=True), table[is_test].reset_index(drop=True)


def shares_with_test(pool, test, group_col: str | None) -> np.ndarray:
    """Per ``pool`` row: whether it shares a file (same absolute path) or a group with a ``test``
    row; such rows must not be drawn, nor learnt from without labels."""
    import numpy as np

    def files(t):
        return [os.path.abspath(p) for p in t["path"].astype(str)]

    overlap = np.isin(files(pool), files(test))
    if group_col is not None and group_col in test:
        test_groups = [k for k in samples.group_keys(test, group_col) if not str(k).startswith("row:")]
        overlap |= np.isin(samples.group_keys(pool, group_col), test_groups)
    return overlap
