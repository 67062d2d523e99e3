import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hematoscope.trust import (OODScorer, ScorerError, get_scorer, list_scorers, load_scorer, register_scorer)


def clusters(n_per_class: int, seed: int):
    """3 tight classes in 16-d; logits = -squared distance to the class centres."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 16) * 4 + 1
    y = np.repeat(np.arange(3), n_per_class)
    feats = centres[y] + rng.normal(0, 0.3, (len(y), 16))
    return feats, y, -((feats[:, None] - centres[None]) ** 2).sum(-1), centres


def outliers(n: int, seed: int, centres):
    """Points equidistant from every class centre: high-energy, flat-softmax, unlike any class."""
    rng = np.random.default_rng(seed)
    feats = centres.mean(0) + rng.normal(0, 0.3, (n, 16))
    return feats, -((feats[:, None] - centres[None]) ** 2).sum(-1)


@pytest.mark.parametrize("name", ["mahalanobis", "knn", "knn_energy", "energy", "max_softmax"])
def test_scorer_interface_separates_and_round_trips(name, tmp_path):
    feats, y, logits, centres = clusters(60, 0)
    test_feats, test_y, test_logits, _ = clusters(20, 1)
    ood_feats, ood_logits = outliers(40, 2, centres)
    scorer = get_scorer(name)().fit(feats, y, logits)
    assert isinstance(scorer, OODScorer) and scorer.name == name
    ind = scorer.score(features=test_feats, logits=test_logits)
    ood = scorer.score(features=ood_feats, logits=ood_logits)
    assert ind.shape == (60,) and ood.shape == (40,) and np.isfinite(ind).all()
    assert roc_auc_score(np.r_[np.zeros(60), np.ones(40)], np.r_[ind, ood]) > 0.95

    scorer.threshold, scorer.target_tpr = 1.5, 0.95
    config = json.loads(json.dumps(scorer.config()))
    assert config["method"] == name and config["threshold"] == 1.5 and config["target_tpr"] == 0.95
    scorer.save(tmp_path)
    assert (tmp_path / "ood.safetensors").exists() == get_scorer(name).needs_features
    loaded = load_scorer(config, tmp_path)
    assert type(loaded) is type(scorer) and loaded.threshold == 1.5
    np.testing.assert_allclose(loaded.score(features=ood_feats, logits=ood_logits), ood, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mahalanobis", "knn", "knn_energy"])
def test_feature_scorers_need_features(name, tmp_path):
    feats, y, logits, _ = clusters(20, 0)
    scorer = get_scorer(name)().fit(feats, y, logits)
    with pytest.raises(ScorerError, match="needs penultimate features"):
        scorer.score(features=None, logits=logits)
    with pytest.raises(ScorerError, match="missing"):
        load_scorer({"method": name, "threshold": 0.0}, tmp_path)
    with pytest.raises(ScorerError, match="not fitted"):
        get_scorer(name)().score(features=feats, logits=logits)


def test_knn_keeps_a_bounded_subset_and_its_parameters(tmp_path):
    feats, y, logits, _ = clusters(100, 0)
    scorer = get_scorer("knn")(k=3, max_train=50, seed=7).fit(feats, y, logits)
    assert scorer.bank_.shape == (50, 16) and scorer.bank_.dtype == np.float16  # half the bytes in the bundle
    np.testing.assert_allclose(np.linalg.norm(scorer.bank_.astype(np.float64), axis=1), 1, rtol=2e-3)
    scorer.save(tmp_path)
    loaded = load_scorer(scorer.config(), tmp_path)
    assert (loaded.k, loaded.max_train, loaded.seed) == (3, 50, 7)
    # A training point's own distance to its 1st neighbour in the bank is ~0 when it is stored.
    one = get_scorer("knn")(k=1).fit(feats[:20], y[:20], logits[:20])
    assert one.score(features=feats[:20], logits=logits[:20]).max() < 2e-3


def test_knn_energy_flags_what_each_part_alone_misses():
    """Far-away features with confident logits (energy cannot see them) and in-cluster features
    with flat logits (feature distance cannot see them): the sum flags both."""
    rng = np.random.default_rng(0)
    feats, y, _, centres = clusters(100, 0)
    confident = lambda labels: np.eye(3)[labels] * 12 + rng.normal(0, 0.5, (len(labels), 3))  # noqa: E731
    scorer = get_scorer("knn_energy")().fit(feats, y, confident(y))
    test_feats, test_y, _, _ = clusters(30, 1)
    far_feats, far_logits = rng.normal(0, 1, (40, 16)) - 3, confident(rng.integers(0, 3, 40))
    near_feats, flat_logits = clusters(14, 2)[0][:40], rng.normal(0, 0.5, (40, 3))
    auc = lambda a, b: roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b])  # noqa: E731
    ind = scorer.score(features=test_feats, logits=confident(test_y))
    assert auc(ind, scorer.score(features=far_feats, logits=far_logits)) > 0.95
    assert auc(ind, scorer.score(features=near_feats, logits=flat_logits)) > 0.95
    knn = get_scorer("knn")().fit(feats, y)
    assert auc(knn.score(features=test_feats), knn.score(features=near_feats)) < 0.8
    energy = get_scorer("energy")()
    assert auc(energy.score(logits=confident(test_y)), energy.score(logits=far_logits)) < 0.8
    with pytest.raises(ScorerError, match="needs the training logits"):
        get_scorer("knn_energy")().fit(feats, y, None)


def test_registry_rejects_unknown_and_duplicate_names():
    assert {"mahalanobis", "knn", "energy", "max_softmax"} <= set(list_scorers())
    with pytest.raises(ScorerError, match="unknown OOD method"):
        get_scorer("crystal-ball")
    with pytest.raises(ScorerError, match="already registered"):
        register_scorer("energy")(type("Other", (OODScorer,), {}))
