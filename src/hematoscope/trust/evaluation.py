"""Measure trust: OOD detection (AUROC, FPR at 95 % TPR) and selective classification
(risk-coverage: accuracy as the least confident images are set aside)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hematoscope._io import save_figure

if TYPE_CHECKING:
    import pandas as pd

    from hematoscope.bundle.base import Bundle

#: Coverages at which risk_coverage reports the selective accuracy.
REPORT_COVERAGES = (0.5, 0.8, 0.9, 0.95, 1.0)
#: At most this many curve points go into JSON / plots (the AURC uses every image).
MAX_CURVE_POINTS = 1000


def ood_metrics(in_scores: np.ndarray, ood_scores: np.ndarray, *, tpr: float = 0.95) -> dict[str, float]:
    """Separation of in-distribution and OOD images by a score (higher = more OOD).

    Args:
        in_scores: scores of in-distribution images.
        ood_scores: scores of out-of-distribution images.
        tpr: in-distribution acceptance rate at which the false positive rate is read.

    Returns:
        ``auroc`` (probability an OOD image scores above an in-distribution one),
        ``fpr_at_95_tpr`` (fraction of OOD images still accepted when the threshold accepts
        ``tpr`` of the in-distribution images; the key keeps its name for other ``tpr``),
        ``aupr_ood`` (average precision with OOD as the positive class), ``n_in``, ``n_ood``.

    Raises:
        ValueError: either set is empty or scores are not finite.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    a, b = np.asarray(in_scores, np.float64).ravel(), np.asarray(ood_scores, np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"need in-distribution and OOD scores; got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("OOD scores must be finite")
    is_ood = np.r_[np.zeros(len(a)), np.ones(len(b))]
    scores = np.r_[a, b]
    # In-distribution is the "positive" for the TPR: accepted = score at or below the threshold.
    fpr, tpr_curve, _ = roc_curve(1 - is_ood, -scores)
    return {
        "auroc": float(roc_auc_score(is_ood, scores)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr_curve, tpr, side="left")]),
        "aupr_ood": float(average_precision_score(is_ood, scores)),
        "n_in": int(len(a)),
        "n_ood": int(len(b)),
    }


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Risk-coverage curve of selective classification [0].

    Images are accepted from the most to the least confident; at coverage ``k/N`` the selective
    accuracy is the accuracy of the ``k`` accepted images and the risk is ``1 - accuracy``.
    Images with equal confidence are accepted together (one curve point per distinct value).

    Args:
        confidence: (N,) confidence of each prediction (higher = more sure).
        correct: (N,) whether each prediction is right.

    Returns:
        ``coverage``, ``accuracy``, ``risk``, ``threshold`` (lists, at most
        :data:`MAX_CURVE_POINTS` points), ``aurc`` (area under the risk-coverage curve: the mean
        risk over the N acceptance steps, tie groups sharing their group's risk),
        ``accuracy_at_coverage`` ({"0.9": ...} for :data:`REPORT_COVERAGES`: accuracy of the
        ``ceil(c N)`` most confident images), ``accuracy_at_90_coverage`` and ``n``.

    [0] Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017.
    """
    conf = np.asarray(confidence, np.float64).ravel()
    ok = np.asarray(correct, bool).ravel()
    if len(conf) != len(ok) or len(conf) == 0:
        raise ValueError(f"need equally many confidences and correctness flags (> 0); got {len(conf)}, {len(ok)}")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    n = len(conf)
    cum_correct = np.cumsum(ok)
    # last index of each tie group: the curve can only stop between distinct confidences
    ends = np.r_[np.flatnonzero(np.diff(conf) != 0), n - 1]
    k = ends + 1
    acc = cum_correct[ends] / k
    group_sizes = np.diff(np.r_[0, k])
    aurc = float(np.sum((1 - acc) * group_sizes) / n)
    at = {}
    for c in REPORT_COVERAGES:
        m = int(np.ceil(c * n - 1e-9))
        at[str(c)] = float(cum_correct[m - 1] / m)
    pick = np.unique(np.linspace(0, len(k) - 1, min(len(k), MAX_CURVE_POINTS)).round().astype(int))
    return {
        "coverage": (k[pick] / n).tolist(),
        "accuracy": acc[pick].tolist(),
        "risk": (1 - acc[pick]).tolist(),
        "threshold": conf[ends][pick].tolist(),
        "aurc": aurc,
        "accuracy_at_coverage": at,
        "accuracy_at_90_coverage": at["0.9"],
        "n": n,
    }


# --- plots -----------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(5, 4), dpi=110)




def plot_risk_coverage(curves: dict[str, dict], path: Path | str) -> Path:
    """Selective accuracy against coverage, one line per ``name → risk_coverage(...)`` entry."""
    plt, fig, ax = _figure()
    for name, rc in curves.items():
        ax.plot(rc["coverage"], rc["accuracy"], label=f"{name} (AURC {rc['aurc']:.4f})")
    ax.axvline(0.9, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="coverage (fraction of images answered)", ylabel="accuracy of answered images",
           title="Risk-coverage", xlim=(0, 1.01))
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


def plot_score_histograms(in_scores: np.ndarray, ood_sets: dict[str, np.ndarray], path: Path | str,
                          *, threshold: float | None = None, title: str = "OOD scores") -> Path:
    """Overlaid histograms of the OOD score for in-distribution and each OOD set."""
    plt, fig, ax = _figure()
    everything = np.concatenate([in_scores, *ood_sets.values()])
    bins = np.linspace(*np.quantile(everything, [0.0, 0.995]), 60)
    ax.hist(in_scores, bins=bins, alpha=0.6, density=True, label="in distribution")
    for name, s in ood_sets.items():
        ax.hist(np.clip(s, bins[0], bins[-1]), bins=bins, alpha=0.5, density=True, label=name)
    if threshold is not None:
        ax.axvline(threshold, color="k", lw=1, ls="--", label="threshold")
    ax.set(xlabel="score (higher = less like training data)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


def plot_reliability(curves: dict[str, dict], path: Path | str) -> Path:
    """Reliability diagram: accuracy against confidence per bin (``reliability_curve`` dicts)."""
    plt, fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for name, c in curves.items():
        pts = [(x, y) for x, y in zip(c["confidence"], c["accuracy"]) if x is not None]
        ax.plot(*zip(*pts), marker="o", ms=3, label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


# --- whole-bundle evaluation -----------------------------------------------------------------
def _image_paths(source) -> list[str]:
    """Image files of a folder (recursive), a single file, a list of paths or a samples table."""
    from hematoscope.data.images import is_image_file

    if hasattr(source, "columns"):
        return [str(p) for p in source["path"]]
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not files:
                raise ValueError(f"{p} holds no image files")
            return files
        return [str(p)]
    return [str(p) for p in source]


def _in_distribution_table(data, rows: str | None = None) -> tuple["pd.DataFrame", str]:
    """A samples table and which of its rows it is: ``rows`` as
    :func:`~hematoscope.data.splits.select_split_rows` chooses them. Without ``rows``: for a
    split file, its ``test`` rows (refused when it has none, e.g. a training run's
    ``split.csv``); for a table, its ``test`` rows when it has any, else every row (a caller
    that chose the rows itself, e.g. ``hematoscope evaluate --split val``)."""
    from hematoscope.data.readers import as_table
    from hematoscope.data.splits import ALL_ROWS, select_split_rows

    table = as_table(data)
    is_path = isinstance(data, (str, Path))
    if rows is not None or is_path:
        table, chosen = select_split_rows(table, rows, data if is_path else "the table")
        return table, chosen or ALL_ROWS
    if "split" in table.columns and (table["split"] == "test").any():
        return table[table["split"] == "test"].reset_index(drop=True), "test"
    parts = sorted({str(p) for p in table["split"]}) if "split" in table.columns else []
    return table.reset_index(drop=True), parts[0] if len(parts) == 1 else ALL_ROWS


def _decisions(bundle: "Bundle", paths: list[str], batch_size: int, description: str):
    """The positions of the readable ones among ``paths`` and the bundle's answers to them, as
    ``predict`` and ``evaluate`` give them (its default views, the cascade when fitted, and its
    framing search)."""
    pred = bundle.predict(paths, batch_size=batch_size, progress=description, warn_skipped=False)  # reported with the results
    kept, at = [], 0
    for source in pred.sources:  # in input order; unreadable files are missing
        while str(paths[at]) != source:
            at += 1
        kept.append(at)
        at += 1
    return np.asarray(kept, dtype=np.int64), pred


def evaluate_ood(bundle: "Bundle", in_table_or_path, ood_source, *, plots_dir: Path | str | None = None,
                 batch_size: int = 64, rows: str | None = None, about: dict[str, Any] | None = None) -> dict[str, Any]:
    """How well a bundle tells ``ood_source`` images from in-distribution data, and how its
    accuracy grows as it abstains.

    The score is the bundle's fitted OOD scorer; a bundle without one is scored by
    ``1 - calibrated confidence`` (said so in ``score``).

    Args:
        bundle: any bundle kind.
        in_table_or_path: in-distribution labelled data: a samples table, a dataset folder or a
            split CSV (its ``test`` rows are used, or the part ``rows`` names).
        ood_source: images that are not what the model was trained on: a folder (recursive),
            a file, a list of paths, or a table with a ``path`` column.
        plots_dir: when given, ``ood_scores.png``, ``risk_coverage.png``, ``reliability.png`` and
            ``trust_eval.json`` are written there.
        batch_size: images per forward pass.
        rows: which rows of a split table to score: a part (``test``, ``val`` ...) or ``all``
            (:func:`hematoscope.data.splits.select_split_rows`); None: the ``test`` rows of a split
            table that has them, else every row.
        about: further keys put first in the report (e.g. ``model``, ``data``).

    Returns:
        ``{**about, "rows", "score", "ood": ood_metrics(...), "at_threshold": {"in_accept_rate",
        "ood_flag_rate"}, "risk_coverage": ..., "ece", "n_in", "n_ood", "skipped", "abstain"}``;
        ``rows`` says which rows were scored (``test``, ``val`` ..., ``all``).

    Raises:
        hematoscope.data.splits.SplitRowsError: ``rows`` does not fit the table.
    """
    from hematoscope.data.samples import class_column
    from hematoscope.taxonomy import TAXONOMY
    from hematoscope.trust.calibration import expected_calibration_error, reliability_curve

    table, rows = _in_distribution_table(in_table_or_path, rows)
    in_paths, ood_paths = [str(p) for p in table["path"]], _image_paths(ood_source)
    in_kept, in_pred = _decisions(bundle, in_paths, batch_size, "in-distribution")
    ood_kept, ood_pred = _decisions(bundle, ood_paths, batch_size, "out-of-distribution")
    if not len(in_kept) or not len(ood_kept):
        raise ValueError("no readable images in the in-distribution or OOD data")
    fitted = bundle.ood is not None and bundle.config.ood is not None
    in_scores = in_pred.ood_score if fitted else 1 - in_pred.confidence
    ood_scores = ood_pred.ood_score if fitted else 1 - ood_pred.confidence

    canon = class_column(table)
    truth = [TAXONOMY.match(str(canon[i]), bundle.labels) if canon[i] is not None else None for i in in_kept]
    known = np.array([t is not None for t in truth])
    if not known.any():
        raise ValueError(f"none of the in-distribution labels map onto the bundle's classes {bundle.labels}")
    y = np.array([bundle.labels.index(t) for t in truth if t is not None])
    probs = in_pred.probs[known]
    correct = probs.argmax(1) == y
    rc = risk_coverage(probs.max(1), correct)
    accepted = ~in_pred.abstain[known]
    report = {
        **(about or {}),
        "rows": rows,  # which rows of DATA were scored as in-distribution
        "score": f"bundle OOD scorer {bundle.config.ood.method}" if fitted else "1 - calibrated confidence "
                 "(no OOD scorer fitted)",
        "ood": ood_metrics(in_scores, ood_scores),
        "at_threshold": {
            "in_accept_rate": float(np.mean(~in_pred.ood_flag)),
            "ood_flag_rate": float(np.mean(ood_pred.ood_flag)),
        } if fitted else None,
        "abstain": {
            "in_abstain_rate": float(np.mean(in_pred.abstain)),
            "ood_abstain_rate": float(np.mean(ood_pred.abstain)),
            "accuracy_answered": float(correct[accepted].mean()) if accepted.any() else None,
        },
        "accuracy": float(correct.mean()),
        "ece": expected_calibration_error(probs, y),
        "risk_coverage": rc,
        "views": bundle.view_mode,  # as predict and evaluate answer: the cascade when fitted
        "n_in": int(len(in_kept)),
        "n_in_labelled": int(known.sum()),
        "n_ood": int(len(ood_kept)),
        "skipped": int(len(in_paths) - len(in_kept) + len(ood_paths) - len(ood_kept)),
    }
    if plots_dir is not None:
        from hematoscope._io import write_json

        d = Path(plots_dir)
        d.mkdir(parents=True, exist_ok=True)
        plot_score_histograms(in_scores, {"OOD data": ood_scores}, d / "ood_scores.png",
                              threshold=bundle.config.ood.threshold if fitted else None, title=report["score"])
        plot_risk_coverage({bundle.name: rc}, d / "risk_coverage.png")
        plot_reliability({bundle.name: reliability_curve(probs, y)}, d / "reliability.png")
        write_json(d / "trust_eval.json", report)
    return report
