"""Feature-level explanations of classical bundles with SHAP's TreeExplainer (exact TreeSHAP).

Per prediction: which named features pushed the model towards its answer, with their values and
units. Globally: an importance plot of the features the trees rely on most.

Contributions are in XGBoost's margin (log-odds) space: for each class ``c`` the contributions
of all features plus the explainer's expected value sum to the raw margin of ``c``; the bundle's
logits (log-probabilities) differ from those margins only by a per-image constant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hematoscope._extras import require


class FeatureContribution(NamedTuple):
    """One row of an explanation: feature ``name``, its ``value`` for the image (None when missing,
    e.g. segmentation failed: the trees then follow their learned missing-value branch), its
    ``unit``, and its SHAP ``contribution`` to the explained class's margin (positive = towards
    that class)."""

    name: str
    value: float | None
    unit: str
    contribution: float


@dataclass
class Contributions:
    """SHAP values of a feature matrix: ``values`` (N, D, C) and ``base`` (C,) expected margins."""

    values: np.ndarray
    base: np.ndarray


def _check_classical(bundle) -> None:
    if getattr(bundle, "kind", None) != "classical" or not hasattr(bundle, "booster"):
        raise ValueError(f"feature explanations need a classical bundle; got kind {getattr(bundle, 'kind', None)!r} "
                         "(use LIME or Grad-CAM for neural bundles)")


def feature_contributions(bundle, features: np.ndarray) -> Contributions:
    """Exact TreeSHAP contributions of every feature to every class margin.

    Args:
        bundle: a classical bundle (``hematoscope.classical.bundle.ClassicalBundle``).
        features: (N, D) feature matrix in the bundle's feature order.

    Raises:
        ValueError: not a classical bundle.
    """
    shap = require("shap", extra="explain", purpose="SHAP explanations")

    _check_classical(bundle)
    explainer = shap.TreeExplainer(bundle.booster)
    values = np.asarray(explainer.shap_values(np.asarray(features, dtype=np.float32)), dtype=np.float64)
    n, d, c = len(features), len(bundle.feature_names), len(bundle.labels)
    values = values.reshape(n, d, c)
    return Contributions(values, np.asarray(explainer.expected_value, dtype=np.float64).reshape(c))


def explain_features(bundle, image: np.ndarray, *, label: str | None = None, top: int = 10) -> list[FeatureContribution]:
    """The features that contributed most to a classical bundle's answer for one image.

    Args:
        bundle: a classical bundle.
        image: RGB uint8 image (H, W, 3).
        label: class to explain; default the predicted class.
        top: number of features returned, largest absolute contribution first.

    Returns:
        Up to ``top`` :class:`FeatureContribution` rows.

    Raises:
        ValueError: not a classical bundle, or ``label`` is not one of its classes.
    """
    _check_classical(bundle)
    feats = bundle.features([image])
    if label is None:
        cls = int(bundle.logits_of(feats)[0].argmax())
    elif label in bundle.labels:
        cls = bundle.labels.index(label)
    else:
        raise ValueError(f"{label!r} is not a class of this bundle ({bundle.labels})")
    contrib = feature_contributions(bundle, feats).values[0, :, cls]
    order = np.argsort(-np.abs(contrib))[:top]
    return [FeatureContribution(bundle.feature_names[i], float(feats[0, i]) if np.isfinite(feats[0, i]) else None,
                                bundle.feature_unit(bundle.feature_names[i]), float(contrib[i])) for i in order]


def global_importance(bundle, top: int = 25) -> list[tuple[str, float]]:
    """(feature name, total gain) of the ``top`` features the boosted trees gain most from."""
    _check_classical(bundle)
    gain = bundle.booster.get_score(importance_type="total_gain")
    return sorted(((k, float(v)) for k, v in gain.items()), key=lambda kv: -kv[1])[:top]


def importance_png(bundle, top: int = 25) -> bytes:
    """PNG bar chart of :func:`global_importance` (feature name and unit on each bar)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = global_importance(bundle, top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    total = sum(v for _, v in global_importance(bundle, top=10**6)) or 1.0
    ax.barh(range(len(rows)), [v / total for _, v in rows], color="#4c72b0")
    ax.set_yticks(range(len(rows)), [f"{k} [{bundle.feature_unit(k)}]" for k, _ in rows], fontsize=8)
    ax.set_xlabel("share of total gain")
    ax.set_title(f"{bundle.name}: top {len(rows)} features (XGBoost gain)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
