"""Evaluation: classification metrics and taxonomy-aware evaluation of any bundle on any dataset.

    >>> from hematoscope.evaluate import evaluate_bundle        # doctest: +SKIP
    >>> report = evaluate_bundle(load_bundle("bundle/"), read_dataset("matek/"), plots_dir="plots/")
"""
from __future__ import annotations


def classification_metrics(y_true, y_pred, probs, labels, **kwargs) -> dict:
    """See :func:`hematoscope.evaluate.metrics.classification_metrics`."""
    from hematoscope.evaluate.metrics import classification_metrics as _metrics

    return _metrics(y_true, y_pred, probs, labels, **kwargs)


def evaluate_bundle(bundle, table, **kwargs) -> dict:
    """See :func:`hematoscope.evaluate.evaluation.evaluate_bundle`."""
    from hematoscope.evaluate.evaluation import evaluate_bundle as _evaluate

    return _evaluate(bundle, table, **kwargs)


__all__ = ["classification_metrics", "evaluate_bundle"]
