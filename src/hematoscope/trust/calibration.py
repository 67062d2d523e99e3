"""Calibration: temperature scaling and the expected calibration error.

Temperature scaling [0] divides the logits by one scalar ``T > 0`` fitted on held-out data by
minimising the negative log-likelihood; it changes confidence, never the predicted class.
ECE [1] is the confidence-weighted gap between accuracy and confidence over equal-width bins.

[0] Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
[1] Naeini et al., "Obtaining Well Calibrated Probabilities Using Bayesian Binning", AAAI 2015.
"""
from __future__ import annotations

import numpy as np

#: Search range for the temperature; outside it the model is either degenerate or the data tiny.
TEMPERATURE_BOUNDS = (0.01, 100.0)


class CalibrationError(ValueError):
    """Inputs to a calibration routine have the wrong shape or content."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (what a bundle calibrates with)."""
    from hematoscope.bundle.base import calibrated_softmax

    return calibrated_softmax(logits, temperature)


def _check(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise CalibrationError(f"expected an (N, C>=2) array, got shape {scores.shape}")
    if len(y) != len(scores) or len(y) == 0:
        raise CalibrationError(f"{len(scores)} rows of scores but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= scores.shape[1]:
        raise CalibrationError("labels must be integer class indices in [0, C)")
    return scores, y.astype(np.int64)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under ``softmax(logits / temperature)``."""
    logits, y = _check(logits, y)
    from scipy.special import logsumexp

    z = logits / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Fit the softmax temperature that minimises the NLL of ``y`` on held-out ``logits``.

    The NLL is smooth and unimodal in ``log T``, so a bounded scalar search (scipy) on
    ``log T`` finds the optimum reliably.

    Args:
        logits: (N, C) raw model outputs on validation data (not used for training).
        y: (N,) integer class indices.

    Returns:
        The temperature ``T`` (> 0); probabilities are then ``softmax(logits / T)``. 1 (no
        change), with a warning, when every image is right: the NLL then keeps falling as ``T``
        goes to 0, and a fit would make every answer 100 % confident, wrong ones too.

    Raises:
        CalibrationError: shapes or labels are invalid.
    """
    import warnings

    from scipy.optimize import minimize_scalar

    logits, y = _check(logits, y)
    if (logits.argmax(1) == y).all():
        warnings.warn(f"all {len(y)} calibration images are classified right, so no temperature can be fitted "
                      "on them (it would make every answer 100 % confident); kept at 1: calibrate on more "
                      "images (a larger validation share)", UserWarning, stacklevel=2)
        return 1.0
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    res = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def _bins(probs: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    confidence = probs.max(1)
    # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 falls in bin 0.
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    return confidence, probs.argmax(1), index


def reliability_curve(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin confidence and accuracy (for reliability diagrams).

    Args:
        probs: (N, C) probabilities.
        y: (N,) integer class indices.
        n_bins: equal-width confidence bins over [0, 1].

    Returns:
        ``{"bin_edges": [n_bins + 1], "confidence": [...], "accuracy": [...], "count": [...]}``;
        ``confidence``/``accuracy`` are ``None`` for empty bins.
    """
    probs, y = _check(probs, y)
    confidence, predicted, index = _bins(probs, n_bins)
    correct = predicted == y
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct.astype(float), minlength=n_bins)
    return {
        "bin_edges": np.linspace(0, 1, n_bins + 1).tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count)],
        "count": count.tolist(),
    }


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE: ``sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|`` over equal-width bins of the
    top-1 confidence.

    Args:
        probs: (N, C) probabilities.
        y: (N,) integer class indices.
        n_bins: number of equal-width bins over [0, 1] (15 as in Guo et al.).

    Returns:
        The ECE in [0, 1].
    """
    probs, y = _check(probs, y)
    confidence, predicted, index = _bins(probs, n_bins)
    gap = np.bincount(index, weights=(predicted == y) - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))
