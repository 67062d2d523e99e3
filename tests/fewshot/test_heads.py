"""Heads follow the scikit-learn estimator contract and classify separable data."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from hematoscope.fewshot.heads import (HEAD_NAMES, CosineKNNClassifier, HeadSpec, PrototypeClassifier, SoftmaxSVC,
                                       make_head)


@parametrize_with_checks([PrototypeClassifier(), CosineKNNClassifier(n_neighbors=3), SoftmaxSVC(),
                          SoftmaxSVC(kernel="rbf")])
def test_sklearn_contract(estimator, check):
    check(estimator)


def _blobs(n_per_class=6, d=20, seed=0):
    centers = np.random.default_rng(0).normal(0, 3, size=(4, d)) + 5  # offset: cosine heads need directions
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + rng.normal(0, 1, size=(n_per_class, d)) for c in centers])
    y = np.repeat(np.array(["a", "b", "c", "d"]), n_per_class)
    return X, y


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("transform,pca", [("standard", None), ("power", 5)])
def test_head_pipelines_learn(name, transform, pca):
    X, y = _blobs()
    Xt, yt = _blobs(seed=1)
    head = make_head(name, transform=transform, pca=pca).fit(X, y)
    proba = head.predict_proba(Xt)
    assert list(head.classes_) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    assert (proba > 0).all()  # log-probabilities must stay finite for calibration
    assert (head.classes_[proba.argmax(1)] == head.predict(Xt)).all()
    assert (head.predict(Xt) == yt).mean() >= 0.9


def test_one_shot_per_class_fits():
    X, y = _blobs(n_per_class=1)
    for name in HEAD_NAMES:
        assert make_head(name).fit(X, y).predict(X).tolist() == y.tolist()


def test_head_spec_round_trip_and_errors():
    spec = HeadSpec("svm", "power", 0.9, {"C": 0.1})
    assert HeadSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown head"):
        HeadSpec("tree")
    with pytest.raises(ValueError, match="transform"):
        make_head("lr", transform="zscore")


def test_self_training_uses_unlabelled_rows():
    X, y = _blobs(n_per_class=1)
    Xu, yu = _blobs(n_per_class=10, seed=2)
    codes = {c: i for i, c in enumerate("abcd")}
    targets = np.concatenate([[codes[c] for c in y], np.full(len(Xu), -1)])
    head = HeadSpec.parse("proto+self").build().fit(np.concatenate([X, Xu]), targets)
    assert head.classes_.tolist() == [0, 1, 2, 3]
    assert head[-1].labeled_iter_.max() >= 1  # some unlabelled rows became pseudo-labels
    assert (head.predict(Xu) == [codes[c] for c in yu]).mean() >= 0.9
    with pytest.raises(ValueError, match="modifier"):
        HeadSpec.parse("lr+mixup")
