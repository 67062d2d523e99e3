"""Is a split safe to fit trust on? ``trust fit`` fits temperature, OOD threshold and abstain
threshold on a split's val rows; on images the model was trained on all three come out too
trusting. A bundle made by ``hematoscope train`` records the sha256 of its run's ``split.csv``
(``config.training.split_file_sha256``; the shipped model also ``split_file_sha256_full``, its
split file with the test rows), and the run keeps that file next to the bundle
(``RUN/split.csv``, ``RUN/bundle/``). :func:`check_fit_split` uses both:

- DATA is the recorded split file (same bytes): fine.
- the run's ``split.csv`` is found next to the bundle (and is the recorded one): DATA's val rows
  are compared with its train rows, by file path and by content hash; any overlap is refused,
  no overlap is fine (e.g. the user's own split file the run was trained from, test rows and all).
- otherwise DATA cannot be checked: refused, unless the caller allows another split
  (``--allow-other-split``) or DATA's val rows come from datasets the bundle was not trained on
  (``dataset`` column vs ``config.data_sources``).

Bundles that record no split (few-shot, classical, hand-made) are not checked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from hematoscope.bundle.base import Bundle

#: The split file ``hematoscope train`` writes into its run directory, next to ``bundle/``
#: (``hematoscope.train.data.SPLIT_FILE``; not imported, to keep torch out of this module).
RUN_SPLIT_FILE = "split.csv"
#: ``config.training`` keys holding the sha256 of a split file the bundle was trained with.
SPLIT_HASH_KEYS = ("split_file_sha256", "split_file_sha256_full")


class TrainingSplitError(ValueError):
    """DATA's val rows were (or may have been) used to train the bundle."""


@dataclass
class SplitCheck:
    """Outcome of :func:`check_fit_split`.

    ``status``: ``"unrecorded"`` (the bundle records no training split), ``"same"`` (DATA is the
    recorded split file), ``"checked"`` (compared with the run's split file: no val row was
    trained on), ``"other_data"`` (DATA's val rows come from other datasets than the bundle's)
    or ``"unchecked"`` (allowed by the caller without a check). ``message`` says so for the
    user; ``run_split`` is the run's split file when found.
    """

    status: str
    message: str | None = None
    run_split: Path | None = None


def recorded_split_hashes(bundle: "Bundle") -> list[str]:
    """sha256 of the split files the bundle records having been trained with (may be empty)."""
    record = bundle.config.training.model_dump()
    return [h for h in (record.get(k) for k in SPLIT_HASH_KEYS) if isinstance(h, str) and h]


def find_run_split(bundle: "Bundle", bundle_path: Path | str, hashes: list[str]) -> tuple[Path | None, Path | None]:
    """The training run's split file next to the bundle: ``(file, None)`` when its sha256 is a
    recorded one, ``(None, file)`` when a ``split.csv`` is there but is not the recorded one,
    ``(None, None)`` when there is none."""
    from hematoscope._io import file_sha256

    home = Path(bundle.path) if getattr(bundle, "path", None) is not None else Path(bundle_path)
    candidate = home.parent / RUN_SPLIT_FILE  # RUN/bundle/ or RUN/bundle.zip -> RUN/split.csv
    if not candidate.is_file():
        return None, None
    return (candidate, None) if file_sha256(candidate) in hashes else (None, candidate)


def trained_on_val_rows(table: "pd.DataFrame", run_split: Path | str) -> list[int]:
    """Indices (into ``table``) of its ``val`` rows that are ``train`` rows of ``run_split``:
    the same file (real path) or the same bytes (sha256: the split's recorded hashes, hashed
    here for a table without them)."""
    import numpy as np

    from hematoscope.data.splits import hash_files, load_split

    run = load_split(run_split, verify=False)
    train = run[run["split"] == "train"]
    paths = {os.path.realpath(p) for p in train["path"]}
    hashes = {h for h in train.get("sha256", []) if isinstance(h, str) and h}
    val = np.flatnonzero(table["split"].to_numpy() == "val")
    val_paths = [str(p) for p in table["path"].to_numpy()[val]]
    hit = [os.path.realpath(p) in paths for p in val_paths]
    if hashes:
        known = table["sha256"].to_numpy()[val] if "sha256" in table else [None] * len(val)
        todo = [i for i, (h, k) in enumerate(zip(hit, known)) if not h and not (isinstance(k, str) and k)]
        fresh = dict(zip(todo, hash_files([val_paths[i] for i in todo], unreadable_as_none=True)))
        hit = [h or (fresh.get(i) if i in fresh else known[i]) in hashes for i, h in enumerate(hit)]
    return [int(val[i]) for i, h in enumerate(hit) if h]


def check_fit_split(bundle: "Bundle", bundle_path: Path | str, data: Path | str, table: "pd.DataFrame", *,
                    split_made_here: bool = False, seed: int = 0, allow_other: bool = False) -> SplitCheck:
    """Refuse to fit trust on val rows the bundle was (or may have been) trained on.

    Args:
        bundle: the loaded bundle.
        bundle_path: where it was loaded from (its run's ``split.csv`` is looked for beside it).
        data: DATA as the user gave it (a split file or a dataset folder).
        table: the samples table trust will be fitted on, with its ``split`` column.
        split_made_here: DATA had no split and ``table``'s was made by the caller (``seed``).
        allow_other: accept a DATA that cannot be checked against the training split
            (``--allow-other-split``); val rows found to be training rows are refused even so.

    Returns:
        A :class:`SplitCheck` (its ``message`` for the user, when there is one).

    Raises:
        TrainingSplitError: val rows of DATA were training rows of the bundle, or DATA is not the
            recorded split and cannot be checked (and ``allow_other`` is False).
    """
    from hematoscope._io import file_sha256

    hashes = recorded_split_hashes(bundle)
    if not hashes:
        return SplitCheck("unrecorded")
    data = Path(data)
    if not split_made_here and data.is_file() and file_sha256(data) in hashes:
        return SplitCheck("same")
    what = f"the split made here of {data} (--seed {seed})" if split_made_here else str(data)
    run_split, other_file = find_run_split(bundle, bundle_path, hashes)
    if run_split is not None:
        trained = trained_on_val_rows(table, run_split)
        n_val = int((table["split"] == "val").sum())
        if trained:
            folder = (" (a folder is split anew here, not as `hematoscope train` split it)"
                      if split_made_here else "")
            raise TrainingSplitError(
                f"{len(trained)} of the {n_val} val images of {what} were training images of {bundle_path}{folder}; "
                f"temperature, OOD threshold and abstain threshold fitted on them would trust the model too much. "
                f"Fit on the split it was trained with, its run's {run_split}: "
                f"hematoscope trust fit {bundle_path} {run_split}")
        return SplitCheck("checked", f"{what} is not the split {bundle_path} was trained with, but none of its "
                                     f"{n_val} val images is a training image of it (checked against {run_split})",
                          run_split)
    record = bundle.config.training.model_dump()
    run = (record.get("config") or {}).get("out") if isinstance(record.get("config"), dict) else None
    sources = set(bundle.config.data_sources or [])
    if sources and "dataset" in table:
        val_sources = {str(s) for s in table.loc[table["split"] == "val", "dataset"] if s is not None}
        if val_sources and not (val_sources & sources):
            return SplitCheck("other_data", f"{what}: its val images come from {', '.join(sorted(val_sources))}, "
                                            f"not from the data {bundle_path} was trained on "
                                            f"({', '.join(sorted(sources))})")
    if other_file is not None and data.is_file() and other_file.resolve() == data.resolve():
        other_file = None  # DATA itself lies beside the bundle: no run split there
    where = (f"the {RUN_SPLIT_FILE} beside the bundle ({other_file}) is not the recorded one either"
             if other_file is not None else f"there is no {RUN_SPLIT_FILE} of its run beside the bundle")
    run_file = f"{run}/{RUN_SPLIT_FILE}" if run else f"RUN/{RUN_SPLIT_FILE}"
    if allow_other:
        return SplitCheck("unchecked", f"{what} is not the split {bundle_path} was trained with and {where}: "
                                       f"its val images are taken on trust (--allow-other-split) not to have been "
                                       f"trained on")
    raise TrainingSplitError(
        f"{bundle_path} was trained on a split it records by hash (sha256 {hashes[0][:12]}…"
        + (f", training run {run!r}" if run else "") + f"), and {what} is not that split: its val images may "
        f"have been trained on, and {where} to check them against. Give that run's split file as DATA "
        f"({run_file}: `hematoscope train` writes it next to the run's bundle/), or add --allow-other-split if "
        f"the val images of {data} were never used to train this bundle")
