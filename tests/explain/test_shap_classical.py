"""SHAP feature explanations of classical bundles."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hematoscope.bundle import load_bundle
from hematoscope.classical.features import FEATURE_NAMES, feature_spec
from hematoscope.data.images import load_image
from hematoscope.explain.shap import (explain_features, feature_contributions, global_importance,
                                      importance_png)


@pytest.fixture(scope="module")
def bundle(tiny_classical_bundle):
    return load_bundle(tiny_classical_bundle)


@pytest.fixture(scope="module")
def images(pbc_subset):
    return [load_image(sorted(d.glob("*.jpg"))[0]) for d in sorted(p for p in pbc_subset.iterdir() if p.is_dir())][:4]


def test_contributions_sum_to_the_margin(bundle, images):
    import xgboost as xgb

    feats = bundle.features(images)
    c = feature_contributions(bundle, feats)
    assert c.values.shape == (len(images), len(FEATURE_NAMES), len(bundle.labels))
    margin = bundle.booster.predict(xgb.DMatrix(feats, feature_names=bundle.feature_names), output_margin=True)
    np.testing.assert_allclose(c.values.sum(1) + c.base, margin, atol=1e-3)
    # The bundle's logits are log-softmax of the same margins.
    logits = bundle.logits_of(feats)
    np.testing.assert_allclose(logits - logits.max(1, keepdims=True), margin - margin.max(1, keepdims=True), atol=1e-4)


def test_explain_features_rows(bundle, images):
    rows = explain_features(bundle, images[0], top=7)
    assert len(rows) == 7
    feats = dict(zip(FEATURE_NAMES, bundle.features(images[:1])[0]))
    for r in rows:
        assert r.name in FEATURE_NAMES and r.unit == feature_spec(r.name).unit
        assert r.value == pytest.approx(feats[r.name], nan_ok=True)
    mags = [abs(r.contribution) for r in rows]
    assert mags == sorted(mags, reverse=True) and mags[0] > 0
    other = explain_features(bundle, images[0], label=bundle.labels[-1], top=3)
    assert len(other) == 3
    with pytest.raises(ValueError, match="not a class"):
        explain_features(bundle, images[0], label="unicorn")


def test_missing_features_are_reported_as_none(bundle):
    import json

    rows = explain_features(bundle, np.full((64, 64, 3), 128, np.uint8), top=len(FEATURE_NAMES))
    values = {r.name: r.value for r in rows}
    assert values["seg_ok"] == 0 and values["nuc_area"] is None
    json.dumps([r._asdict() for r in rows], allow_nan=False)  # what the CLI and the web API emit


def test_global_importance_plot(bundle):
    top = global_importance(bundle, top=5)
    assert 1 <= len(top) <= 5 and all(name in FEATURE_NAMES for name, _ in top)
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    im = Image.open(io.BytesIO(importance_png(bundle, top=5)))
    assert im.format == "PNG" and im.size[0] > 300


def test_neural_bundles_are_refused(tiny_neural_bundle):
    with pytest.raises(ValueError, match="classical bundle"):
        explain_features(load_bundle(tiny_neural_bundle), np.zeros((32, 32, 3), np.uint8))


def test_the_classical_explainer_is_called_as_grad_cam_is(bundle, images):
    """explain(images) explains the bundle's answers; classes by name or index; paths too."""
    explainer = bundle.explainer()
    answered = bundle.predict(images[:2]).predicted
    assert [e.target for e in explainer.explain(images[:2])] == answered
    other = next(c for c in bundle.labels if c != answered[0])
    assert explainer.explain(images[:1], [other])[0].target == other
    assert explainer.explain(images[:1], [bundle.labels.index(other)])[0].target == other
    with pytest.raises(ValueError, match="not a class"):
        explainer.explain(images[:1], ["banana"])
