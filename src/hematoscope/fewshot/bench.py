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


def class_column(table) -> np.ndarray:
    """Per row: the canonical class name where the taxonomy knows the label, else the label."""
    labels = table["label"].astype(str).to_numpy(dtype=object)
    if "canonical" not in table:
        return labels
    canon = table["canonical"].to_numpy(dtype=object)
    return np.array([c if isinstance(c, str) and c else lab for c, lab in zip(canon, labels)], dtype=object)


def holdout_split(table, *, test_fraction: float = 0.2, max_test: int | None = 2000, seed: int = 0):
    """Split ``table`` (stratified, seed-fixed) into a shot pool and a test part; the test part
    is subsampled (stratified) to at most ``max_test`` rows to bound extraction cost."""
    from hematoscope.data.splits import make_split

    df = make_split(table, val=0.0, test=test_fraction, seed=seed)
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


def _draws(labels, shots, repeats, seed, exclude):
    usable = np.flatnonzero(~exclude)
    out = {}
    for r in range(repeats):
        for s in shots:
            d = sample_shots(labels[usable], s, seed=seed + r)
            out[(s, r)] = (usable[d.indices], d.short)
    return out


def run_benchmark(train, extractor, *, test=None, shots: Sequence[int | None] = (1, 5, 10, 20, 50, 100),
                  heads: Sequence[str | HeadSpec] = ("lr", "svm", "knn"), repeats: int = 5, seed: int = 0,
                  test_fraction: float = 0.2, max_test: int | None = 2000, max_pool_per_class: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Score heads on frozen features for each number of labels per class.

    Args:
        train: samples table the shots are drawn from.
        extractor: a :class:`~hematoscope.fewshot.features.FeatureExtractor`.
        test: samples table to score on; None = a held-out stratified part of ``train``.
        shots: labels per class (None = all of the pool).
        heads: head names (``"lr+self"`` = with self-training on the rest of the pool as
            unlabelled images) or :class:`HeadSpec` objects.
        repeats: draws per shot count (seeds ``seed .. seed + repeats - 1``).
        seed: base seed of the split and of the draws.
        test_fraction, max_test: held-out part when ``test`` is None.
        max_pool_per_class: draw shots from a fixed random subset of at most this many training
            images per class (bounds feature extraction; draws then overlap more across repeats).
        progress: show a progress bar for extraction.

    Returns:
        A JSON-able dict: ``results`` (one row per (shots, head) with mean/sd of balanced
        accuracy and macro-F1 and the fit time), the class match, short classes, sizes.

    Raises:
        ValueError: no class in common between train and test, or an empty table.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score

    specs = [h if isinstance(h, HeadSpec) else HeadSpec.parse(h) for h in heads]
    if test is None:
        pool, test = holdout_split(train, test_fraction=test_fraction, max_test=max_test, seed=seed)
        test_source = f"held-out {test_fraction:.0%} of train (stratified, seed {seed}), {len(test)} images"
    else:
        pool, test_source = train.reset_index(drop=True), "separate test table"
    if max_pool_per_class is not None:
        pool = pool.iloc[sample_shots(class_column(pool), max_pool_per_class, seed=seed + 10_000).indices]
        pool = pool.reset_index(drop=True)
    if len(pool) == 0 or len(test) == 0:
        raise ValueError("the training pool or the test set is empty")
    y_pool, y_test_raw = class_column(pool), class_column(test)
    match = match_classes(y_pool, y_test_raw)
    if not match.shared:
        raise ValueError(f"no class in common between train {sorted(set(y_pool))} and test {sorted(set(y_test_raw))}")
    scored = np.array([c in match.test_to_shared for c in y_test_raw])
    test = test[scored].reset_index(drop=True)
    y_test = np.array([match.test_to_shared[c] for c in y_test_raw[scored]], dtype=object)

    # features: the test set, then every drawn image; redraw around unreadable files
    pool_paths = pool["path"].astype(str).to_numpy()
    fs = extractor.extract(list(test["path"].astype(str)), progress=progress)
    X_test, y_test = fs.features, y_test[fs.ok]
    skipped = [s.source for s in fs.skipped]
    bad = np.zeros(len(pool), bool)
    feats: dict[int, np.ndarray] = {}
    semi = any(spec.self_training is not None for spec in specs)
    while True:
        draws = _draws(y_pool, shots, repeats, seed, bad)
        wanted = set(range(len(pool))) if semi else {int(i) for idx, _ in draws.values() for i in idx}
        need = sorted(wanted - set(feats) - set(np.flatnonzero(bad)))
        if not need:
            break
        fs = extractor.extract(list(pool_paths[need]), progress=progress)
        for i, row in zip(np.asarray(need)[fs.ok], fs.features):
            feats[int(i)] = row
        bad[np.asarray(need)[~fs.ok]] = True
        skipped += [s.source for s in fs.skipped]

    labels_shared = match.shared
    classes = sorted(set(y_pool))
    y_code = np.array([classes.index(c) for c in y_pool])
    readable = np.array(sorted(feats))
    rows = []
    for s in shots:
        for spec in specs:
            bacc, f1, secs, n_train = [], [], [], 0
            for r in range(repeats):
                idx, _ = draws[(s, r)]
                targets = y_code[idx]
                if spec.self_training is not None:  # the rest of the pool, as unlabelled images
                    idx = np.concatenate([idx, np.setdiff1d(readable, idx)])
                    targets = np.concatenate([targets, np.full(len(idx) - len(targets), -1)])
                X = np.stack([feats[int(i)] for i in idx])
                head = spec.build()
                t0 = time.perf_counter()
                head.fit(X, targets)
                secs.append(time.perf_counter() - t0)
                pred = np.array([match.train_to_shared.get(classes[p], OTHER) for p in head.predict(X_test)],
                                dtype=object)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    bacc.append(float(balanced_accuracy_score(y_test, pred)))
                    f1.append(float(f1_score(y_test, pred, labels=labels_shared, average="macro", zero_division=0)))
                n_train = int((targets >= 0).sum())
            rows.append({
                "shots": "all" if s is None else s, "head": spec.label, "head_spec": spec.to_dict(),
                "n_train": n_train,
                "balanced_accuracy_mean": float(np.mean(bacc)), "balanced_accuracy_sd": float(np.std(bacc)),
                "macro_f1_mean": float(np.mean(f1)), "macro_f1_sd": float(np.std(f1)),
                "fit_seconds_mean": float(np.mean(secs)), "balanced_accuracy": bacc, "macro_f1": f1,
            })
    short = {str("all" if s is None else s): sh for (s, r), (_, sh) in draws.items() if sh and r == 0}
    return {
        "extractor": extractor.describe(), "extractor_identity": extractor.identity,
        "preprocess": extractor.preprocess.to_dict(), "tta": extractor.tta,
        "repeats": repeats, "seed": seed, "test_source": test_source, "max_pool_per_class": max_pool_per_class,
        "n_pool": int(len(pool) - bad.sum()), "n_test": int(len(y_test)),
        "classes_scored": labels_shared,
        "unmatched_train_classes": match.unmatched_train, "unmatched_test_classes": match.unmatched_test,
        "short_classes": short, "skipped_files": skipped, "results": rows,
    }


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
