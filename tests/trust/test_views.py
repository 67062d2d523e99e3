"""Trust per view count and the adaptive-view cascade: fitting from one pass of every view,
the gate, persistence, and the fallback of bundles fitted before per-view trust."""
from __future__ import annotations

import re

import json
import logging

import numpy as np
import pytest

from hematoscope.bundle.base import BundleConfig, CascadeRule, ModelOutput, ViewTrust, load_bundle
from hematoscope.bundle.neural import NeuralBundle
from hematoscope.bundle.prediction import Prediction
from hematoscope.models.preprocess import Preprocess
from hematoscope.trust.views import CascadeTolerance, ViewOutputs, fit_cascade, fit_view_trust, view_outputs


class QuadrantRunner:
    """A stand-in network: the logit of class 0 is 4 x the mean of channel 0 over the top-left
    quadrant of the input (so flips and rotations change it); classes 1 and 2 get 0. Features
    are that mean and its square. Records how many images each call saw."""

    def __init__(self):
        self.calls: list[int] = []

    def run(self, x):
        self.calls.append(len(x))
        h, w = x.shape[2] // 2, x.shape[3] // 2
        m = x[:, 0, :h, :w].mean(axis=(1, 2))
        logits = np.stack([4 * m, np.zeros_like(m), np.zeros_like(m)], axis=1).astype(np.float32)
        return logits, np.stack([m, m * m], axis=1).astype(np.float32)


def _hand_built_bundle(cascade: CascadeRule | None) -> tuple[NeuralBundle, QuadrantRunner]:
    config = BundleConfig(kind="neural", labels=["a", "b", "c"], model={"arch": "none"}, tta=8,
                          preprocess=Preprocess(size=8, mean=(0, 0, 0), std=(1, 1, 1)).to_dict(),
                          temperature=2.0, abstain_threshold=0.5,
                          ood={"method": "energy", "threshold": 0.0, "target_tpr": 0.95, "temperature": 1.0})
    config.view_trust = {"1": ViewTrust(temperature=1.0, abstain_threshold=0.5, ood_threshold=0.0),
                         "8": ViewTrust(temperature=2.0, abstain_threshold=0.5, ood_threshold=0.0)}
    config.view_trust_of = config.trust_fingerprint()
    config.cascade = cascade
    bundle = NeuralBundle(config)
    from hematoscope.trust import load_scorer

    bundle.ood = load_scorer(config.ood.model_dump(), ".")
    runner = QuadrantRunner()
    bundle._runner = runner
    return bundle, runner


def _cells() -> list[np.ndarray]:
    confident = np.zeros((8, 8, 3), np.uint8)
    confident[:4, :4] = 255  # bright top-left quadrant: class 0 at logit 4 from the identity view only
    uncertain = np.full((8, 8, 3), 64, np.uint8)  # every view: logit 1 → confidence 0.58 with 1 view
    return [confident, uncertain]


def test_cascade_takes_the_slow_path_only_for_the_uncertain_cell():
    bundle, runner = _hand_built_bundle(CascadeRule(min_confidence=0.9))
    assert bundle.uses_cascade and bundle.view_mode == "cascade"
    pred = bundle.predict_arrays(_cells(), ["confident", "uncertain"])
    assert pred.views.tolist() == [1, 8]
    # one fast call with both cells, then 7 more views of the uncertain cell alone
    assert runner.calls == [2] + [1] * 7
    assert pred.share_with_views(8) == pytest.approx(0.5)

    # the slow answer is exactly the 8-view answer with the 8-view trust (temperature 2) ...
    bundle.set_tta(8)
    assert not bundle.uses_cascade
    full = bundle.predict_arrays(_cells(), ["confident", "uncertain"])
    np.testing.assert_allclose(pred.probs[1], full.probs[1], rtol=1e-6)
    assert pred.abstain[1] == full.abstain[1]
    # ... and the fast answer is the 1-view answer with the 1-view trust (temperature 1)
    bundle.set_tta(1)
    fast = bundle.predict_arrays(_cells(), ["confident", "uncertain"])
    np.testing.assert_allclose(pred.probs[0], fast.probs[0], rtol=1e-6)
    assert fast.probs[0].max() > full.probs[0].max()  # the two temperatures really differ


def test_cascade_ood_gate_and_reject_level():
    # energy with 1 view: confident cell -logsumexp([4, 0, 0]) = -4.04, uncertain -logsumexp([1, 0, 0]) = -1.55
    bundle, runner = _hand_built_bundle(CascadeRule(min_confidence=0.0, max_ood=-3.0, reject_ood=None))
    assert bundle.predict_arrays(_cells(), ["c", "u"]).views.tolist() == [1, 8]
    bundle, runner = _hand_built_bundle(CascadeRule(min_confidence=0.0, max_ood=-3.0, reject_ood=-2.0))
    pred = bundle.predict_arrays(_cells(), ["c", "u"])
    assert pred.views.tolist() == [1, 1]  # past the reject level: flagged at once, no more views
    assert runner.calls == [2]


def _prediction(probs, abstain, ood=None) -> Prediction:
    probs = np.asarray(probs, float)
    n = len(probs)
    ood = np.full(n, np.nan) if ood is None else np.asarray(ood, float)
    abstain = np.asarray(abstain, bool)
    return Prediction(["a", "b"], probs, [str(i) for i in range(n)], ood, np.zeros(n, bool), abstain,
                      [None] * n)


def test_fit_cascade_sends_exactly_the_cells_the_fast_path_gets_wrong():
    # 100 cells of class 0; the fast path is wrong (class 1) on the 10 least confident ones, the
    # slow path right on all: the cheapest rule that keeps the slow path's accuracy sends those 10.
    conf = np.concatenate([np.linspace(0.80, 0.84, 10), np.linspace(0.9, 0.999, 90)])
    fast_probs = np.stack([conf, 1 - conf], 1)
    fast_probs[:10] = fast_probs[:10, ::-1]
    fast = _prediction(fast_probs, np.zeros(100))
    slow = _prediction(np.tile([0.95, 0.05], (100, 1)), np.zeros(100))
    rule = fit_cascade(fast, slow, np.zeros(100, int), fast_abstain=0.75, fast_ood=None,
                       tolerance=CascadeTolerance(accuracy=0.0, accuracy_answered=0.0, abstained=0.0))
    assert rule.val["slow_share"] == pytest.approx(0.10)
    assert rule.val["accuracy"] == 1.0
    assert 0.84 < rule.min_confidence <= 0.9
    # with a tolerance of 5 points the fast path may keep half of its mistakes
    loose = fit_cascade(fast, slow, np.zeros(100, int), fast_abstain=0.75, fast_ood=None,
                        tolerance=CascadeTolerance(accuracy=0.05, accuracy_answered=0.05, abstained=0.0))
    assert loose.val["slow_share"] < 0.10 and loose.val["accuracy"] >= 0.95


def test_fit_cascade_picks_the_cheapest_slow_path_that_matches_the_most_views():
    conf = np.concatenate([np.linspace(0.80, 0.84, 10), np.linspace(0.9, 0.999, 90)])
    fast_probs = np.stack([conf, 1 - conf], 1)
    fast_probs[:10] = fast_probs[:10, ::-1]  # wrong on its 10 least confident cells
    fast = _prediction(fast_probs, np.zeros(100))
    right = _prediction(np.tile([0.95, 0.05], (100, 1)), np.zeros(100))
    half_wrong = np.tile([0.95, 0.05], (100, 1))
    half_wrong[:5] = [0.3, 0.7]
    strict = CascadeTolerance(accuracy=0.0, accuracy_answered=0.0, abstained=0.0)
    y = np.zeros(100, int)
    # 4 views as right as 8 on the uncertain cells: the slow path takes 4 (3 extra views, not 7)
    rule = fit_cascade(fast, {4: right, 8: right}, y, fast_abstain=0.75, fast_ood=None, tolerance=strict)
    assert rule.slow_views == 4 and rule.val["extra_views_per_cell"] == pytest.approx(0.3)
    # 4 views still wrong on half of them: only 8 views keep the accuracy of 8 views
    rule = fit_cascade(fast, {4: _prediction(half_wrong, np.zeros(100)), 8: right}, y, fast_abstain=0.75,
                       fast_ood=None, tolerance=strict)
    assert rule.slow_views == 8 and rule.val["slow_share"] == pytest.approx(0.10)


def test_view_outputs_average_like_the_bundle(tiny_neural_bundle):
    bundle = load_bundle(tiny_neural_bundle)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (50, 50, 3), dtype=np.uint8) for _ in range(3)]
    vo = view_outputs(bundle, images)
    assert vo.views == 8 and len(vo) == 3
    for n in (1, 2, 8):
        bundle.set_tta(n)
        out = bundle.forward(images)
        np.testing.assert_array_equal(vo.averaged(n).logits, out.logits)
        np.testing.assert_array_equal(vo.averaged(n).features, out.features)


@pytest.fixture(scope="module")
def fitted(tiny_neural_bundle, tmp_path_factory):
    """The tiny bundle with trust fitted per view count and a cascade, on random images whose
    'class' is their dominant colour channel, saved and loaded back."""
    bundle = load_bundle(tiny_neural_bundle)
    rng = np.random.default_rng(0)
    images, y = [], []
    for i in range(120):
        im = rng.integers(0, 120, (48, 48, 3), dtype=np.uint8)
        im[..., i % 3] += 120
        images.append(im)
        y.append(i % 3)
    vo, y = view_outputs(bundle, images), np.array(y)
    report = fit_view_trust(bundle, train=(vo.take(np.arange(80)), y[:80]), val=(vo.take(np.arange(80, 120)), y[80:]),
                            target_tpr=0.9, target_answered=None)
    path = bundle.save(tmp_path_factory.mktemp("fitted") / "bundle")
    return bundle, load_bundle(path), vo.take(np.arange(80, 120)), y[80:], report


def test_each_view_count_gets_its_own_threshold_at_the_target_acceptance(fitted):
    bundle, _, val, y, report = fitted
    assert sorted(bundle.config.view_trust, key=int) == ["1", "2", "4", "8"]
    thresholds = set()
    for v, entry in bundle.config.view_trust.items():
        pred = bundle.decide(val.averaged(int(v)), [str(i) for i in range(len(y))], views=int(v))
        assert np.mean(~pred.ood_flag) == pytest.approx(0.9, abs=0.03)  # fitted on these images
        assert pred.views.tolist() == [int(v)] * len(y)
        thresholds.add(round(entry.ood_threshold, 6))
        assert entry.ood_params and entry.val["n"] == len(y)
    assert len(thresholds) == 4  # outputs of different view counts need different thresholds
    assert report["cascade"] is not None and bundle.config.cascade is not None


def test_per_view_trust_and_cascade_round_trip_through_the_bundle(fitted):
    bundle, loaded, val, y, _ = fitted
    assert loaded.config.view_trust == bundle.config.view_trust
    assert loaded.config.cascade == bundle.config.cascade
    assert loaded.uses_cascade
    names = [str(i) for i in range(len(y))]
    for v in (1, 8):
        np.testing.assert_allclose(loaded.decide(val.averaged(v), names, views=v).ood_score,
                                   bundle.decide(val.averaged(v), names, views=v).ood_score, rtol=1e-4, atol=1e-4)
    raw = json.loads((loaded.path / "config.json").read_text())
    assert set(raw["view_trust"]) == {"1", "2", "4", "8"} and raw["cascade"]["slow_views"] in (2, 4, 8)


def test_old_bundle_without_per_view_trust_loads_and_falls_back(fitted, tmp_path, caplog):
    _, loaded, val, y, _ = fitted
    raw = json.loads((loaded.path / "config.json").read_text())
    for key in ("view_trust", "view_trust_of", "cascade"):
        del raw[key]  # what bundles written before per-view trust look like
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    for f in loaded.path.iterdir():
        (old_dir / f.name).write_bytes(f.read_bytes())
    (old_dir / "config.json").write_text(json.dumps(raw))
    old = load_bundle(old_dir)
    assert not old.uses_cascade and old.view_mode == str(raw["tta"])
    own = old.trust_for()
    assert own.fallback is None and own.temperature == raw["temperature"]
    other = 1 if raw["tta"] != 1 else 8
    with caplog.at_level(logging.WARNING, logger="hematoscope"):
        t = old.trust_for(other)
    assert t.fallback is not None and "no trust fitted for" in t.fallback and "trust fit" in t.fallback
    assert t.temperature == raw["temperature"] and t.ood_threshold == raw["ood"]["threshold"]
    assert any("no trust fitted" in r.message for r in caplog.records)
    old.set_tta(other)  # as `predict --tta N` does: the settings are still those fitted for raw["tta"]
    assert old.trust_for().fallback is not None and old.trust_for().temperature == raw["temperature"]
    assert len(old.predict_arrays([np.zeros((20, 20, 3), np.uint8)], ["x"])) == 1  # still predicts
    old.set_tta(raw["tta"])
    assert old.trust_for().fallback is None


def test_refitting_the_bundle_wide_trust_alone_retires_the_per_view_entries(fitted):
    _, loaded, _, _, _ = fitted
    loaded.config.ood = {**loaded.config.ood.model_dump(), "threshold": loaded.config.ood.threshold + 1.0}  # as adapt does
    assert not loaded.uses_cascade
    t = loaded.trust_for(1)
    assert t.fallback is not None and "refitted" in t.fallback
    assert t.ood_threshold == loaded.config.ood.threshold


def test_ood_threshold_answers_the_target_share_with_the_abstain_rule():
    from hematoscope.trust.views import ood_threshold_for

    scores = np.arange(1000, dtype=float)
    rng = np.random.default_rng(0)
    confident = rng.random(1000) > 0.04  # 4 % set aside as low confidence, spread over all scores
    t = ood_threshold_for(scores, confident, target_tpr=0.5, target_answered=0.9)
    assert np.mean(confident & (scores <= t)) == pytest.approx(0.9, abs=0.002)
    assert np.mean(scores <= t) > 0.93  # the OOD flag alone accepts more than 90 %
    # never below the target_tpr quantile ...
    t = ood_threshold_for(scores, confident, target_tpr=0.97, target_answered=0.9)
    assert t == pytest.approx(np.quantile(scores, 0.97))
    # ... never above the 99 % quantile, even when low confidence alone sets aside too many
    t = ood_threshold_for(scores, rng.random(1000) > 0.1, target_tpr=0.95, target_answered=0.95)
    assert t == pytest.approx(np.quantile(scores, 0.99))
    assert ood_threshold_for(scores, confident, target_tpr=0.9, target_answered=None) == pytest.approx(
        np.quantile(scores, 0.9))


def test_view_trust_keys_are_validated():
    with pytest.raises(ValueError, match="view_trust keys"):
        BundleConfig(kind="neural", labels=["a", "b"], preprocess={},
                     view_trust={"3": ViewTrust(temperature=1.0, abstain_threshold=0.5)})
    with pytest.raises(ValueError, match="view counts"):
        CascadeRule(min_confidence=0.5, slow_views=3)


def test_view_outputs_concat_and_take():
    a = ViewOutputs(np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2), None)
    b = ViewOutputs.concat([a.take(np.array([0])), a.take(np.array([1, 2]))])
    np.testing.assert_array_equal(b.logits, a.logits)
    with pytest.raises(ValueError, match="views asked"):
        a.averaged(4)
    assert isinstance(a.averaged(2), ModelOutput)


def test_trust_fit_cli_fits_every_view_count_and_the_cascade_in_one_pass(tiny_neural_bundle, synthetic_root,
                                                                        tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from hematoscope.cli.main import app

    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split

    bundle_dir = shutil.copytree(tiny_neural_bundle, tmp_path / "bundle")
    import json

    metrics_file = bundle_dir / "metrics.json"  # as `train` leaves it: its own fit's values on top
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    metrics_file.write_text(json.dumps({**metrics, "temperature": 9.9, "ece_before": 0.5, "ece_after": 0.4}))
    runner = CliRunner()
    split = tmp_path / "split.csv"
    table = make_split(read_dataset(synthetic_root), val=0.4, test=0.0, seed=0)
    save_split(table.groupby(["split", "canonical"]).head(4).reset_index(drop=True), split)  # 8 classes x 4 + 4
    calls = []
    original = NeuralBundle.forward_views

    def counting(self, images, views=8):
        calls.append((len(images), views))
        return original(self, images, views)

    monkeypatch.setattr(NeuralBundle, "forward_views", counting)
    r = runner.invoke(app, ["trust", "fit", str(bundle_dir), str(split)])
    assert r.exit_code == 0, r.output
    assert "1 view: temperature" in r.output and "8 views: temperature" in r.output
    assert "cascade (default)" in r.output
    # a tiny random network is confident on few cells: the aim of answering 95 % is said to be missed
    answered = [float(a) for a in re.findall(r"answered ([0-9.]+)%", r.output)]
    assert answered and (min(answered) < 94.5) == ("aim of answering 95% of val was not reached" in
                                                   " ".join(r.output.split()))
    # the model ran once per image, all 8 views at once: no second pass for the 1-view settings
    assert sum(n for n, _ in calls) == 64 and {v for _, v in calls} == {8}
    fitted = load_bundle(bundle_dir)
    assert sorted(fitted.config.view_trust, key=int) == ["1", "2", "4", "8"] and fitted.uses_cascade
    # the top-level calibration keys a training run wrote are the refit's, not the replaced fit's
    for key in ("temperature", "ece_before", "ece_after"):
        assert fitted.metrics[key] == fitted.metrics["calibration"][key] != {"temperature": 9.9}.get(key)
    r = runner.invoke(app, ["predict", str(synthetic_root / "basophil"), "--model", str(bundle_dir)])
    assert r.exit_code == 0 and "views: cascade" in r.output and "took the slow path" in r.output
    r = runner.invoke(app, ["predict", str(synthetic_root / "basophil"), "--model", str(bundle_dir), "--tta", "1"])
    assert r.exit_code == 0 and "views: 1 per cell" in r.output
    r = runner.invoke(app, ["trust", "fit", str(bundle_dir), str(split), "--tta", "2"])
    assert r.exit_code == 0, r.output
    fixed = load_bundle(bundle_dir)
    assert fixed.config.tta == 2 and not fixed.uses_cascade
    assert fixed.config.temperature == fixed.config.view_trust["2"].temperature


def test_ood_accept_moves_every_view_counts_flag_to_the_stored_share(fitted, tmp_path):
    """The operating point is chosen after fitting, without the training data: each view count
    accepts the asked share of the cells its thresholds were fitted on, and it is saved."""
    from hematoscope.bundle.ood import OOD_ACCEPT_LEVELS

    _, saved, val, y, _ = fitted
    loaded = load_bundle(saved.path)  # fresh: other tests change the module's copy
    names = [str(i) for i in range(len(y))]
    assert set(loaded.config.ood.accept_levels) == {str(q) for q in OOD_ACCEPT_LEVELS}
    flagged = {}
    for share in (0.8, 0.99):
        loaded.set_ood_accept(share)
        for v in (1, 8):
            pred = loaded.decide(val.averaged(v), names, views=v)
            assert np.mean(~pred.ood_flag) == pytest.approx(share, abs=1 / len(y) + 1e-9)
            flagged[share, v] = pred.ood_flag
    for v in (1, 8):
        assert not (flagged[0.99, v] & ~flagged[0.8, v]).any()  # looser flags a subset
    reloaded = load_bundle(loaded.save(tmp_path / "loose"))
    assert reloaded.config.ood_accept == 0.99 and reloaded.describe()["ood_accept"] == 0.99
    np.testing.assert_array_equal(reloaded.decide(val.averaged(1), names, views=1).ood_flag, flagged[0.99, 1])
    reloaded.set_ood_accept(None)
    assert reloaded.trust_for(1).ood_threshold == reloaded.config.view_trust["1"].ood_threshold


def test_ood_accept_refuses_unknown_shares_and_bundles_fitted_before_levels(fitted):
    from hematoscope.bundle.base import BundleError

    bundle = load_bundle(fitted[1].path)
    with pytest.raises(BundleError, match="0.8, 0.9, 0.95, 0.975"):
        bundle.set_ood_accept(0.97)
    bundle.config.view_trust["1"].ood_accept_levels = {}  # as a bundle fitted before the levels were stored
    with pytest.raises(BundleError, match="trust fit"):
        bundle.set_ood_accept(0.99)
    assert bundle.config.ood_accept is None
