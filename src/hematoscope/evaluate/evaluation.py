"""Evaluate a bundle on a labelled table, matching labels through the taxonomy.

A bundle trained on one dataset can be scored on another's common classes:

- a data class that is the bundle's class or a descendant of it (``neutrophil_segmented`` for a
  bundle class ``neutrophil``) is scored as that class;
- a bundle class finer than the data (bundle ``neutrophil_band`` + ``neutrophil_segmented``,
  data ``neutrophil``) is merged into the data's coarser class, probabilities summed;
- data classes the bundle cannot name are counted under ``unknown_classes`` and not scored.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hematoscope._io import save_figure

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle


def label_space(bundle_labels: list[str], data_classes: set[str]) -> tuple[list[str], dict[str, str]]:
    """Evaluation classes and the map bundle class → evaluation class.

    A bundle class becomes its nearest ancestor that the data uses (when the data does not use
    the class itself); otherwise it stays as it is.
    """
    from hematoscope.taxonomy import TAXONOMY

    merge = {}
    for b in bundle_labels:
        chain = TAXONOMY.ancestors(b) if b in TAXONOMY.types else [b]
        merge[b] = next((a for a in chain if a in data_classes), b)
    space = list(dict.fromkeys(merge[b] for b in bundle_labels))
    return space, merge


def match_truth(truth: str, space: list[str]) -> str | None:
    """The evaluation class ``truth`` is scored as (itself or an ancestor), or None."""
    from hematoscope.taxonomy import TAXONOMY

    if truth in space:
        return truth
    return TAXONOMY.match(truth, space)


def evaluate_bundle(bundle: "Bundle", table, *, batch_size: int = 64, plots_dir: Path | str | None = None) -> dict:
    """Classify every image of ``table`` and score the ones whose class the bundle knows.

    Args:
        bundle: any bundle kind.
        table: samples table (``path``, ``label``, ``canonical`` columns).
        batch_size: images per forward pass.
        plots_dir: when given, ``confusion_matrix.png`` and ``reliability.png`` are written there.

    Returns:
        :func:`~hematoscope.evaluate.metrics.classification_metrics` on the scored images (with
        calibrated probabilities, so ``ece`` is after temperature scaling) plus ``label_map``
        (data class → evaluation class), ``merged`` (bundle class → evaluation class where they
        differ), ``unknown_classes`` ({data class: count} not scored), ``skipped`` (unreadable
        files with reasons), ``abstained`` / ``accuracy_answered`` (the bundle's abstain rule),
        ``seen_by_bundle`` (scored images the bundle learnt from or was calibrated on, by
        content: not a test of it), ``views`` (the view mode: ``"cascade"`` or a count) and ``slow_share`` (the share of
        images the cascade ran with all views), and ``predictions`` (one record per scored image:
        source, truth, prediction, confidence, abstain, OOD score, views).

    Raises:
        ValueError: no image of ``table`` has a class the bundle knows, or none is readable.
    """
    from hematoscope.data.samples import class_column, require_labels
    from hematoscope.evaluate.metrics import classification_metrics

    require_labels(table, "evaluating")
    truths = class_column(table).tolist()
    space, merge = label_space(bundle.labels, set(truths))
    matched = [match_truth(t, space) for t in truths]
    unknown: dict[str, int] = {}
    for t, m in zip(truths, matched):
        if m is None:
            unknown[t] = unknown.get(t, 0) + 1
    rows = [i for i, m in enumerate(matched) if m is not None]
    if not rows:
        raise ValueError(f"none of the data's classes {sorted(set(truths))} is known to bundle "
                         f"{bundle.name!r} ({bundle.labels})")
    paths = [str(table["path"].iloc[i]) for i in rows]
    # decoded while the model runs; unreadable files are reported with the results
    pred = bundle.predict(paths, batch_size=batch_size, progress="evaluating", warn_skipped=False)
    truth_of = {p: matched[i] for p, i in zip(paths, rows)}
    # Sum the probabilities of bundle classes merged into one evaluation class.
    to_space = np.zeros((len(bundle.labels), len(space)))
    for j, b in enumerate(bundle.labels):
        to_space[j, space.index(merge[b])] = 1
    probs = pred.probs @ to_space
    y_true = np.array([space.index(truth_of[s]) for s in pred.sources], dtype=np.int64)
    if len(y_true) == 0:
        raise ValueError("none of the images could be read")
    y_pred = probs.argmax(1)
    report = classification_metrics(y_true, y_pred, probs, space)
    answered = ~np.asarray(pred.abstain, dtype=bool)
    report.update({
        "label_map": {t: m for t, m in sorted(set(zip(truths, matched))) if m is not None},
        "merged": {b: m for b, m in merge.items() if b != m},
        "unknown_classes": unknown,
        "skipped": [{"source": s.source, "reason": s.reason} for s in pred.skipped],
        "abstained": float(1 - answered.mean()),
        "accuracy_answered": float((y_pred == y_true)[answered].mean()) if answered.any() else None,
        "seen_by_bundle": _seen_by_bundle(bundle, table, rows),
        "views": bundle.view_mode,
        "slow_share": (pred.share_with_views(bundle.config.cascade.slow_views)
                       if bundle.uses_cascade and pred.views is not None else None),
        "predictions": [{"truth": space[t], **{k: r[k] for k in ("source", "prediction", "confidence", "abstain",
                                                                  "abstain_reason", "ood_score")},
                         **({"views": r["views"]} if "views" in r else {})}
                        for t, r in zip(y_true, pred.records(1))],
    })
    if plots_dir is not None:
        plot_confusion_matrix(np.array(report["confusion_matrix"]), space, Path(plots_dir) / "confusion_matrix.png")
        from hematoscope.trust.calibration import reliability_curve
        from hematoscope.trust.evaluation import plot_reliability

        plot_reliability({bundle.name: reliability_curve(probs, y_true)}, Path(plots_dir) / "reliability.png")
    return report


def _seen_by_bundle(bundle: "Bundle", table, rows: list[int]) -> int:
    """How many of the scored rows are images the bundle learnt from or was calibrated on
    (``config.seen_images``: a few-shot head's draws, a lab's adaptation crops), by file content."""
    from hematoscope.bundle.config import SEEN_DIGITS
    from hematoscope.data.splits import hash_files

    seen = set(bundle.config.seen_images)
    if not seen:
        return 0
    known = table["sha256"].iloc[rows].tolist() if "sha256" in table else [None] * len(rows)
    missing = [i for i, d in enumerate(known) if not isinstance(d, str) or len(d) < SEEN_DIGITS]
    for i, d in zip(missing, hash_files([str(table["path"].iloc[rows[i]]) for i in missing], unreadable_as_none=True)):
        known[i] = d
    return sum(1 for d in known if d and d[:SEEN_DIGITS] in seen)


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], path: Path) -> Path:
    """Write a confusion matrix PNG (rows = true, columns = predicted; cells = counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    from hematoscope.taxonomy import TAXONOMY

    n = len(labels)
    fig, ax = plt.subplots(figsize=(2 + 0.7 * n, 1.6 + 0.7 * n), dpi=100)
    ConfusionMatrixDisplay(matrix, display_labels=[TAXONOMY.display(lab) for lab in labels]).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, values_format="d")
    ax.set_title("Confusion matrix (rows: true class)")
    return save_figure(fig, path)
