"""Classification metrics (scikit-learn) in one JSON-able dict."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], probs: np.ndarray | None,
                           labels: Sequence[str], *, n_bins: int = 15) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1/support and the
    confusion matrix; plus expected calibration error when ``probs`` is given.

    Args:
        y_true: true class indices into ``labels``.
        y_pred: predicted class indices into ``labels``.
        probs: (N, C) class probabilities, or None.
        labels: class names in index order.
        n_bins: confidence bins for the calibration error.

    Returns:
        {"n", "accuracy", "balanced_accuracy", "macro_f1", "ece" (when probs), "per_class":
        {label: {"precision", "recall", "f1", "support"}}, "confusion_matrix": rows = true,
        columns = predicted, "labels", "predicted_other_classes"}. Balanced accuracy and
        macro-F1 average over the classes present in ``y_true`` (the classes the data has: a
        set of white cells is not scored on platelets); an answer naming another class is an
        error of its true class, and ``predicted_other_classes`` is the share of such answers.

    Raises:
        ValueError: empty input or mismatched lengths.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise ValueError(f"need equal, non-zero numbers of true and predicted labels; got {len(y_true)}, "
                         f"{len(y_pred)}")
    import warnings

    index = np.arange(len(labels))
    present = np.unique(y_true)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=index, zero_division=0)
    with warnings.catch_warnings():  # answers of classes the data lacks are counted below, not warned about
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(y_true, y_pred)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "predicted_other_classes": float(np.mean(~np.isin(y_pred, present))),
    }
    if probs is not None:
        from hematoscope.trust import expected_calibration_error

        out["ece"] = float(expected_calibration_error(np.asarray(probs), y_true, n_bins=n_bins))
    out["per_class"] = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                              "support": int(s[i])} for i, lab in enumerate(labels)}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=index).tolist()
    out["labels"] = list(labels)
    return out
