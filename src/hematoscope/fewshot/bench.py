"""Few-label benchmark: balanced accuracy and macro-F1 against labels per class, per head.

Shots are drawn from a training table with fixed seeds (one per repeat, nested across shot
counts, see :mod:`hematoscope.fewshot.shots`) and scored on a test table, or on a held-out
stratified part of the training table. The test table may come from another dataset: classes
are matched through the taxonomy (a finer class counts as its coarser ancestor when only the
ancestor exists on the other side), only shared classes are scored, the rest are reported.

Features are extracted once, only for the images some draw or the test set needs, and cached.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hematoscope.data.samples import class_column, group_keys, require_labels, resolve_group_by
from hematoscope.data.splits import shares_with_test, split_parts
from hematoscope.fewshot.heads import HeadSpec
from hematoscope.fewshot.shots import sample_shots

OTHER = "__unmatched__"


@dataclass
class ClassMatch:
    """How training classes and test classes map onto a shared label space.

    Attributes:
        train_to_shared: training class → shared class (absent = unmatched).
        test_to_shared: test class → shared class (absent = unmatched, not scored).
        unmatched_train, unmatched_test: classes with no counterpart on the other side.
    """

    train_to_shared: dict[str, str]
    test_to_shared: dict[str, str]
    unmatched_train: list[str] = field(default_factory=list)
    unmatched_test: list[str] = field(default_factory=list)

    @property
    def shared(self) -> list[str]:
        return sorted(set(self.test_to_shared.values()))


def match_classes(train_classes: Sequence[str], test_classes: Sequence[str]) -> ClassMatch:
    """Match canonical class names through the taxonomy: equal names, or one side's class
    falling under the other side's coarser class (e.g. ``neutrophil_band`` → ``neutrophil``)."""
    from hematoscope.taxonomy import TAXONOMY

    train, test = sorted(set(train_classes)), sorted(set(test_classes))
    tr_map: dict[str, str] = {}
    te_map: dict[str, str] = {}
    for a in train:  # training class equal to or finer than a test class
        b = TAXONOMY.match(a, test)
        if b is not None:
            tr_map[a] = te_map[b] = b
    for b in test:  # test class finer than a training class
        a = TAXONOMY.match(b, train)
        if a is not None and b not in te_map:
            tr_map.setdefault(a, a)
            te_map[b] = tr_map[a]
    return ClassMatch(tr_map, te_map, [a for a in train if a not in tr_map], [b for b in test if b not in te_map])


def holdout_split(table, *, test_fraction: float = 0.2, max_test: int | None = 2000, seed: int = 0,
                  group_by: str | None = None):
    """Split ``table`` (stratified, seed-fixed) into a shot pool and a test part; the test part
    is subsampled (stratified) to at most ``max_test`` rows to bound extraction cost. With
    ``group_by`` whole groups go to one side (``make_split``'s grouped split)."""
    from hematoscope.data.splits import make_split

    df = make_split(table, val=0.0, test=test_fraction, seed=seed, group_by=group_by)
    pool, test = df[df["split"] == "train"], df[df["split"] == "test"]
    if max_test is not None and len(test) > max_test:
        rng = np.random.default_rng(seed)
        labels = class_column(test)
        keep = []
        for cls in sorted(set(labels)):
            idx = np.flatnonzero(labels == cls)
            keep.append(rng.permutation(idx)[:max(1, round(len(idx) * max_test / len(test)))])
        test = test.iloc[np.sort(np.concatenate(keep))]
    return pool.reset_index(drop=True), test.reset_index(drop=True)


def _draws(labels, shots, repeats, seed, exclude, groups=None):
    usable = np.flatnonzero(~exclude)
    out = {}
    for r in range(repeats):
        for s in shots:
            d = sample_shots(labels[usable], s, seed=seed + r, groups=None if groups is None else groups[usable])
            out[(s, r)] = (usable[d.indices], d.short)
    return out


#: The recipe ``hematoscope fewshot bench`` uses by default (measured best, docs/fewshot.md).
DEFAULT_HEADS = ("svm+self",)
DEFAULT_POOL_PER_CLASS = 400
DEFAULT_SHOTS = (1, 5, 10, 20, 50)


def run_benchmark(train, extractor, *, test=None, shots: Sequence[int | None] = DEFAULT_SHOTS,
                  heads: Sequence[str | HeadSpec] = DEFAULT_HEADS, repeats: int = 5, seed: int = 0,
                  test_fraction: float = 0.2, max_test: int | None = 2000,
                  max_pool_per_class: int | None = DEFAULT_POOL_PER_CLASS, group_by: str | None = "auto",
                  n_jobs: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Score heads on frozen features for each number of labels per class.

    Group-aware: with ``group_by`` (default: the ``patient`` column when it has ids; e.g. the
    crops of one LISC cell) no group has images on both the pool side and the test side, and
    ``k`` labels per class are ``k`` different groups, one image each.

    Args:
        train: samples table the shots are drawn from. A split file's table (``split`` column)
            gives its train/val rows as the pool and, when ``test`` is None, its test rows as
            the test set.
        extractor: a :class:`~hematoscope.fewshot.features.FeatureExtractor`.
        test: samples table to score on; None = the split file's test rows, else a held-out
            stratified (grouped) part of ``train``. Pool rows with the same file path or group
            as a test row are dropped from the pool.
        shots: labels per class (None = all of the pool).
        heads: head names (``"svm+self"`` = with self-training on the rest of the pool as
            unlabelled images) or :class:`HeadSpec` objects.
        repeats: draws per shot count (seeds ``seed .. seed + repeats - 1``).
        seed: base seed of the split and of the draws.
        test_fraction, max_test: held-out part when ``test`` is None and ``train`` has no test rows.
        max_pool_per_class: draw shots from a fixed random subset of at most this many pool
            images per class (bounds feature extraction; self-training uses the rest of it as
            unlabelled images); None = the whole pool.
        group_by: ``"auto"``, a column name (``"patient"``), or None for no grouping.
        n_jobs: head fits run in parallel threads (default: the CPU cores).
        progress: show a progress bar for extraction.

    Returns:
        A JSON-able dict: ``results`` (one row per (shots, head) with ``balanced_accuracy_mean``,
        ``balanced_accuracy_sd``, ``macro_f1_mean``, ``macro_f1_sd``, the per-draw values and the
        fit time), the class match, short classes, sizes, grouping, timings.

    Raises:
        ValueError: no class in common between train and test, or an empty table.
    """
    from joblib import Parallel, delayed

    t_start = time.perf_counter()
    specs = [h if isinstance(h, HeadSpec) else HeadSpec.parse(h) for h in heads]
    pool, split_test = split_parts(train)
    group_col = resolve_group_by(pool, group_by)
    if test is None and split_test is not None:
        test, test_source = split_test, f"test rows of the split file, {len(split_test)} images"
    elif test is None:
        pool, test = holdout_split(pool, test_fraction=test_fraction, max_test=max_test, seed=seed,
                                   group_by=group_col)
        test_source = (f"held-out {test_fraction:.0%} of train (stratified{', by ' + group_col if group_col else ''}, "
                       f"seed {seed}), {len(test)} images")
    else:
        test_part = split_parts(test)[1]
        test, test_source = (test if test_part is None else test_part), "separate test table"
    pool, test = pool.reset_index(drop=True), test.reset_index(drop=True)
    # nothing of the test side on the pool side: same file, or same group
    overlap = shares_with_test(pool, test, group_col)
    pool = pool[~overlap].reset_index(drop=True)
    groups = group_keys(pool, group_col)
    if max_pool_per_class is not None:
        pool = pool.iloc[sample_shots(class_column(pool), max_pool_per_class, seed=seed + 10_000).indices]
        groups = None if groups is None else groups[pool.index.to_numpy()]
        pool = pool.reset_index(drop=True)
    if len(pool) == 0 or len(test) == 0:
        raise ValueError("the training pool or the test set is empty")
    require_labels(pool, "fewshot bench")
    require_labels(test, "fewshot bench")
    y_pool, y_test_raw = class_column(pool), class_column(test)
    match = match_classes(y_pool, y_test_raw)
    if not match.shared:
        raise ValueError(f"no class in common between train {sorted(set(y_pool))} and test {sorted(set(y_test_raw))}")
    scored = np.array([c in match.test_to_shared for c in y_test_raw])
    test = test[scored].reset_index(drop=True)
    y_test = np.array([match.test_to_shared[c] for c in y_test_raw[scored]], dtype=object)

    # features: the test set, then every drawn image (the whole capped pool for self-training)
    t0 = time.perf_counter()
    pool_paths = pool["path"].astype(str).to_numpy()
    fs = extractor.extract(list(test["path"].astype(str)), progress=progress)
    X_test, y_test = fs.features, y_test[fs.ok]
    skipped = [s.source for s in fs.skipped]
    computed = fs.computed
    bad = np.zeros(len(pool), bool)
    feats: dict[int, np.ndarray] = {}
    semi = any(spec.self_training is not None for spec in specs)
    while True:
        draws = _draws(y_pool, shots, repeats, seed, bad, groups)
        wanted = set(range(len(pool))) if semi else {int(i) for idx, _ in draws.values() for i in idx}
        need = sorted(wanted - set(feats) - set(np.flatnonzero(bad)))
        if not need:
            break
        fs = extractor.extract(list(pool_paths[need]), progress=progress)
        computed += fs.computed
        for i, row in zip(np.asarray(need)[fs.ok], fs.features):
            feats[int(i)] = row
        bad[np.asarray(need)[~fs.ok]] = True
        skipped += [s.source for s in fs.skipped]
    extract_seconds = time.perf_counter() - t0

    labels_shared = match.shared
    classes = sorted(set(y_pool))
    y_code = np.array([classes.index(c) for c in y_pool])
    readable = np.array(sorted(feats))

    def score(spec: HeadSpec, s, r) -> tuple[float, float, float, int]:
        from sklearn.metrics import balanced_accuracy_score, f1_score

        idx, _ = draws[(s, r)]
        targets = y_code[idx]
        if spec.self_training is not None:  # the rest of the pool, as unlabelled images
            idx = np.concatenate([idx, np.setdiff1d(readable, idx)])
            targets = np.concatenate([targets, np.full(len(idx) - len(targets), -1)])
        X = np.stack([feats[int(i)] for i in idx])
        head = spec.build()
        t = time.perf_counter()
        head.fit(X, targets)
        secs = time.perf_counter() - t
        pred = np.array([match.train_to_shared.get(classes[p], OTHER) for p in head.predict(X_test)], dtype=object)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bacc = float(balanced_accuracy_score(y_test, pred))
            f1 = float(f1_score(y_test, pred, labels=labels_shared, average="macro", zero_division=0))
        return bacc, f1, secs, int((targets >= 0).sum())

    t0 = time.perf_counter()
    jobs = [(spec, s, r) for s in shots for spec in specs for r in range(repeats)]
    n_jobs = n_jobs or _cores()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scores = Parallel(n_jobs=min(n_jobs, len(jobs)), prefer="threads")(delayed(score)(*j) for j in jobs)
    fit_seconds = time.perf_counter() - t0
    by_key = {(spec.label, s, r): out for (spec, s, r), out in zip(jobs, scores)}
    rows = []
    for s in shots:
        for spec in specs:
            outs = [by_key[(spec.label, s, r)] for r in range(repeats)]
            bacc, f1, secs = [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]
            rows.append({
                "shots": "all" if s is None else s, "head": spec.label, "head_spec": spec.to_dict(),
                "n_train": outs[-1][3],
                "balanced_accuracy_mean": float(np.mean(bacc)), "balanced_accuracy_sd": float(np.std(bacc)),
                "macro_f1_mean": float(np.mean(f1)), "macro_f1_sd": float(np.std(f1)),
                "fit_seconds_mean": float(np.mean(secs)), "balanced_accuracy": bacc, "macro_f1": f1,
            })
    short = {str("all" if s is None else s): sh for (s, r), (_, sh) in draws.items() if sh and r == 0}
    return {
        "extractor": extractor.describe(), "extractor_identity": extractor.identity,
        "preprocess": extractor.preprocess.to_dict(), "views": extractor.views,
        "backend": getattr(extractor, "active_backend", None),
        "repeats": repeats, "seed": seed, "test_source": test_source, "max_pool_per_class": max_pool_per_class,
        "group_by": group_col, "n_pool_dropped_overlap": int(overlap.sum()),
        "n_pool_groups": None if groups is None else int(len(set(groups[~bad]))),
        "n_pool": int(len(pool) - bad.sum()), "n_test": int(len(y_test)),
        "classes_scored": labels_shared,
        "unmatched_train_classes": match.unmatched_train, "unmatched_test_classes": match.unmatched_test,
        "short_classes": short, "skipped_files": skipped, "features_computed": int(computed),
        "extract_seconds": round(extract_seconds, 1), "fit_seconds": round(fit_seconds, 1),
        "seconds": round(time.perf_counter() - t_start, 1), "results": rows,
    }


def _cores() -> int:
    from hematoscope.bundle.neural_onnx import physical_cores

    return physical_cores()


def results_table(result: dict, shots: Sequence[str | int] | None = None) -> str:
    """A Markdown table: one row per head, one column per shot count (mean ± sd balanced acc.)."""
    rows = result["results"]
    cols = shots or list(dict.fromkeys(r["shots"] for r in rows))
    heads = list(dict.fromkeys(r["head"] for r in rows))
    cell = {(r["head"], r["shots"]): f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_sd']:.3f}"
            for r in rows}
    lines = ["| head | " + " | ".join(f"{c} / class" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {h} | " + " | ".join(cell.get((h, c), "") for c in cols) + " |" for h in heads]
    return "\n".join(lines)


def plot_curve(results: dict[str, dict] | dict, path: Path | str, *, metric: str = "balanced_accuracy") -> Path:
    """Learning-curve PNG: ``metric`` (mean ± sd) against labels per class, one line per head
    (and per run when ``results`` maps run names to benchmark results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hematoscope import _io

    runs = results if "results" not in results else {"": results}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for run_name, res in runs.items():
        numeric = [r for r in res["results"] if r["shots"] != "all"]
        for head in dict.fromkeys(r["head"] for r in numeric):
            pts = [r for r in numeric if r["head"] == head]
            x = [r["shots"] for r in pts]
            ax.errorbar(x, [r[f"{metric}_mean"] for r in pts], yerr=[r[f"{metric}_sd"] for r in pts],
                        marker="o", capsize=3, label=f"{run_name} {head}".strip())
    ax.set_xscale("log")
    ticks = sorted({r["shots"] for res in runs.values() for r in res["results"] if r["shots"] != "all"})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labels per class")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _io.save_figure(fig, path)
