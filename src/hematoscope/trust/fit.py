"""Fit everything a bundle needs to say "I don't know": temperature, OOD scorer + threshold,
abstain threshold."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hematoscope.trust.calibration import (expected_calibration_error, fit_temperature, nll, softmax)
from hematoscope.trust.scorers import ScorerError, get_scorer

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle, ModelOutput

#: Default cost of abstaining relative to a wrong answer: a human review of one image is taken
#: to cost a quarter of a misclassified cell. With calibrated probabilities Chow's rule then
#: abstains below a confidence of 1 - 0.25 = 0.75.
DEFAULT_ABSTAIN_COST = 0.25


def class_indices(bundle: "Bundle", y: np.ndarray) -> np.ndarray:
    """``y`` as integer indices into ``bundle.labels`` (accepts indices or label names).

    Raises:
        ValueError: a label name is not one of the bundle's classes.
    """
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    index = {lab: i for i, lab in enumerate(bundle.labels)}
    unknown = sorted({str(v) for v in y} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of bundle {bundle.name!r} ({bundle.labels})")
    return np.array([index[str(v)] for v in y], dtype=np.int64)


def fit_trust(
    bundle: "Bundle",
    *,
    train: tuple["ModelOutput", np.ndarray],
    val: tuple["ModelOutput", np.ndarray],
    target_tpr: float = 0.95,
    method: str | None = None,
    abstain_min_confidence: float | None = None,
    abstain_cost: float = DEFAULT_ABSTAIN_COST,
) -> dict[str, Any]:
    """Calibrate a bundle and give it an OOD scorer and an abstain threshold, in place.

    1. Temperature: fitted on the validation logits (NLL); ECE before/after is recorded.
    2. OOD scorer ``method`` (default ``mahalanobis`` when the model gives features, else
       ``energy``) fitted on the training outputs; its threshold is the ``target_tpr``
       quantile of the validation scores, so that fraction of in-distribution images is accepted.
    3. Abstain threshold: ``abstain_min_confidence`` when given, otherwise Chow's rule on the
       calibrated probabilities: abstain when confidence < ``1 - abstain_cost``, the point
       below which answering is expected to cost more than a review (an error costs 1, a
       review ``abstain_cost``).

    Sets ``bundle.config.temperature``, ``.ood``, ``.abstain_threshold``, ``bundle.ood`` and
    ``bundle.metrics["calibration"]`` / ``["trust"]``; the caller saves the bundle.

    Args:
        bundle: any bundle kind.
        train: (model outputs, labels) on training images, labels as indices or names.
        val: (model outputs, labels) on validation images, disjoint from ``train``.
        target_tpr: fraction of in-distribution validation images the OOD flag must accept.
        method: a registered scorer name (:func:`hematoscope.trust.list_scorers`).
        abstain_min_confidence: fixed abstain threshold in [0, 1] instead of Chow's rule.
        abstain_cost: cost of one abstention relative to one error, in (0, 1).

    Returns:
        A JSON-able report: temperature, ECE/NLL before and after, OOD config, validation
        acceptance and selective accuracy.

    Raises:
        ValueError: invalid arguments, or a feature scorer asked for a model without features.
    """
    if not 0 < target_tpr < 1:
        raise ValueError(f"target_tpr must be in (0, 1), got {target_tpr}")
    if not 0 < abstain_cost < 1:
        raise ValueError(f"abstain_cost must be in (0, 1), got {abstain_cost}")
    if abstain_min_confidence is not None and not 0 <= abstain_min_confidence <= 1:
        raise ValueError(f"abstain_min_confidence must be in [0, 1], got {abstain_min_confidence}")
    (train_out, train_y), (val_out, val_y) = train, val
    train_y, val_y = class_indices(bundle, train_y), class_indices(bundle, val_y)

    temperature = fit_temperature(val_out.logits, val_y)
    probs_before, probs_after = softmax(val_out.logits), softmax(val_out.logits, temperature)
    calibration = {
        "split": "val",
        "n": int(len(val_y)),
        "temperature": temperature,
        "ece_before": expected_calibration_error(probs_before, val_y),
        "ece_after": expected_calibration_error(probs_after, val_y),
        "nll_before": nll(val_out.logits, val_y),
        "nll_after": nll(val_out.logits, val_y, temperature),
    }

    method = method or ("mahalanobis" if train_out.features is not None else "energy")
    cls = get_scorer(method)
    if cls.needs_features and (train_out.features is None or val_out.features is None):
        raise ScorerError(f"OOD method {method!r} needs penultimate features, which this "
                          f"{bundle.kind} bundle does not give; use 'energy' or 'max_softmax'")
    scorer = cls(temperature=temperature) if method == "max_softmax" else cls()
    scorer.fit(train_out.features, train_y, train_out.logits)
    val_scores = scorer.score(features=val_out.features, logits=val_out.logits)
    scorer.threshold = float(np.quantile(val_scores, target_tpr))
    scorer.target_tpr = float(target_tpr)

    abstain = float(abstain_min_confidence) if abstain_min_confidence is not None else 1.0 - abstain_cost
    bundle.config.temperature = temperature
    bundle.config.abstain_threshold = abstain
    bundle.config.ood = scorer.config()
    bundle.ood = scorer

    flagged = val_scores > scorer.threshold
    low = probs_after.max(1) < abstain
    accepted = ~(flagged | low)
    correct = probs_after.argmax(1) == val_y
    trust = {
        "split": "val",
        "ood_method": method,
        "ood_threshold": scorer.threshold,
        "val_ood_accept_rate": float(np.mean(~flagged)),
        "abstain_threshold": abstain,
        "abstain_rule": "user value" if abstain_min_confidence is not None else f"chow, cost {abstain_cost}",
        "val_coverage": float(accepted.mean()),
        "val_accuracy": float(correct.mean()),
        "val_accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else None,
    }
    bundle.metrics["calibration"] = calibration
    bundle.metrics["trust"] = trust
    return {"calibration": calibration, "ood": bundle.config.ood, **trust}
