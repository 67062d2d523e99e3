import numpy as np
import pytest

from hematoscope.bundle.base import ModelOutput, load_bundle
from hematoscope.bundle.prediction import LOW_CONFIDENCE, UNLIKE_TRAINING
from hematoscope.trust import ScorerError, fit_trust


def outputs(bundle, data):
    images, y = data
    return bundle.forward(images), y


def test_fit_trust_sets_bundle_and_accepts_target_fraction(toy, kit):
    bundle, train, val, test = toy
    report = fit_trust(bundle, train=outputs(bundle, train), val=outputs(bundle, val), target_tpr=0.9)
    assert bundle.config.ood.method == "knn_energy" and report["ood"] == bundle.config.ood.model_dump()
    assert bundle.ood is not None and bundle.config.temperature == report["calibration"]["temperature"]
    assert report["val_ood_accept_rate"] == pytest.approx(0.9, abs=0.02)
    assert bundle.config.abstain_threshold == pytest.approx(0.75)  # Chow's rule at cost 0.25
    cal = bundle.metrics["calibration"]
    assert cal["ece_after"] <= cal["ece_before"] + 1e-9 and cal["nll_after"] <= cal["nll_before"] + 1e-9

    pred = bundle.predict(kit.not_cells(20, 5))
    assert pred.ood_flag.all() and pred.abstain.all()
    assert set(pred.abstain_reason) == {UNLIKE_TRAINING}
    held_out = bundle.predict(test[0])
    assert held_out.ood_flag.mean() < 0.3
    assert held_out.differential().to_dict()  # abstentions counted apart, not as a class


def test_a_fixed_temperature_is_kept_and_the_report_is_computed_with_it(toy):
    """For validation logits no temperature can be fitted on (a head's own training images),
    the caller fixes it; ECE and accuracy on accepted cells must then use that value."""
    from hematoscope.trust.calibration import expected_calibration_error, softmax

    bundle, train, val, _ = toy
    val_out = bundle.forward(val[0])
    report = fit_trust(bundle, train=outputs(bundle, train), val=(val_out, val[1]), temperature=1.0)
    assert bundle.config.temperature == 1.0 == report["calibration"]["temperature"]
    assert report["calibration"]["ece_after"] == pytest.approx(report["calibration"]["ece_before"])
    assert report["calibration"]["ece_after"] == pytest.approx(
        expected_calibration_error(softmax(val_out.logits), np.asarray(val[1])))
    # the toy model is right on every validation image, which leaves nothing to fit: one wrong
    # label makes it miscalibrated, and a fit moves it
    labels = list(val[1])
    labels[0] = next(lab for lab in labels if lab != labels[0])
    fitted = fit_trust(bundle, train=outputs(bundle, train), val=(val_out, labels))["calibration"]["temperature"]
    assert fitted != pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        fit_trust(bundle, train=outputs(bundle, train), val=(val_out, val[1]), temperature=0.0)


def test_a_bundle_without_views_can_move_its_flag_to_a_stored_share(toy):
    """Kinds without per-view trust (classical, few-shot) keep their levels with the OOD config."""
    bundle, train, val, _ = toy
    val_out = bundle.forward(val[0])
    fit_trust(bundle, train=outputs(bundle, train), val=(val_out, val[1]))
    scores = bundle.ood.score(features=val_out.features, logits=val_out.logits)
    bundle.set_ood_accept(0.8)
    assert bundle.trust_for().ood_threshold == bundle.config.ood.accept_levels["0.8"] < bundle.config.ood.threshold
    assert np.mean(bundle.predict(val[0]).ood_flag) == pytest.approx(np.mean(scores > np.quantile(scores, 0.8)))
    fit_trust(bundle, train=outputs(bundle, train), val=(val_out, val[1]))
    assert bundle.config.ood_accept is None  # a refit sets the operating point anew


def test_threshold_and_scorer_persist_through_save_and_load(toy, kit, tmp_path):
    bundle, train, val, test = toy
    fit_trust(bundle, train=outputs(bundle, train), val=outputs(bundle, val), method="knn")
    before = bundle.predict(test[0] + kit.not_cells(10, 6))
    for target in (tmp_path / "b", tmp_path / "b.zip"):
        loaded = load_bundle(bundle.save(target))
        assert isinstance(loaded, kit.ToyBundle) and loaded.config.ood == bundle.config.ood
        assert loaded.config.temperature == bundle.config.temperature
        after = loaded.predict(test[0] + kit.not_cells(10, 6))
        np.testing.assert_allclose(after.ood_score, before.ood_score, rtol=1e-5)
        assert after.abstain_reason == before.abstain_reason


def test_abstain_reasons_low_confidence_versus_unlike_training(toy, kit):
    bundle, train, val, _ = toy
    fit_trust(bundle, train=outputs(bundle, train), val=outputs(bundle, val), abstain_min_confidence=0.9)
    assert bundle.config.abstain_threshold == 0.9
    val_out = bundle.forward(val[0])
    typical = int(np.argmin(bundle.ood.score(features=val_out.features, logits=val_out.logits)))
    green = bundle.forward(kit.not_cells(2, 1)[:1])
    features = np.concatenate([val_out.features[[typical, typical]], green.features])
    # same typical features; confident logits, near-tie logits; then a not-a-cell image
    logits = np.array([[20.0, 0, 0], [1.0, 0.9, 0], [20.0, 0, 0]]) * bundle.config.temperature
    pred = bundle.decide(ModelOutput(logits, features), ["sure", "torn", "green"])
    assert pred.abstain_reason == [None, LOW_CONFIDENCE, UNLIKE_TRAINING]
    assert pred.abstain.tolist() == [False, True, True] and pred.ood_flag.tolist() == [False, False, True]
    assert pred.predicted[2] == bundle.labels[0]  # an abstained image keeps its probabilities


def test_default_method_without_features_is_energy_and_feature_methods_refuse(toy, kit):
    _, train, val, _ = toy
    bundle = kit.ToyBundle.create(with_features=False).fit(*train)
    report = fit_trust(bundle, train=outputs(bundle, train), val=outputs(bundle, val))
    assert report["ood_method"] == "energy" and bundle.config.ood.method == "energy"
    with pytest.raises(ScorerError, match="needs penultimate features"):
        fit_trust(bundle, train=outputs(bundle, train), val=outputs(bundle, val), method="mahalanobis")


def test_labels_may_be_names_and_bad_arguments_raise(toy):
    bundle, train, val, _ = toy
    names = np.array(bundle.labels)
    fit_trust(bundle, train=(bundle.forward(train[0]), names[train[1]]), val=(bundle.forward(val[0]), names[val[1]]))
    with pytest.raises(ValueError, match="not classes"):
        fit_trust(bundle, train=(bundle.forward(train[0]), np.array(["x"] * len(train[1]))),
                  val=outputs(bundle, val))
    with pytest.raises(ValueError, match="target_tpr"):
        fit_trust(bundle, train=outputs(bundle, train), val=outputs(bundle, val), target_tpr=1.5)


def test_saving_back_home_keeps_files_that_save_does_not_write(toy, tmp_path):
    import zipfile

    bundle, train, val, _ = toy
    for target in (tmp_path / "b", tmp_path / "b.zip"):
        bundle.save(target)
        if target.suffix == ".zip":
            with zipfile.ZipFile(target, "a") as zf:
                zf.writestr("model.onnx", b"onnx bytes")
        else:
            (target / "model.onnx").write_bytes(b"onnx bytes")
        loaded = load_bundle(target)
        fit_trust(loaded, train=outputs(loaded, train), val=outputs(loaded, val), method="energy")
        loaded.save(target)
        assert load_bundle(target).config.ood.method == "energy"
        if target.suffix == ".zip":
            with zipfile.ZipFile(target) as zf:
                assert zf.read("model.onnx") == b"onnx bytes"
        else:
            assert (target / "model.onnx").read_bytes() == b"onnx bytes"
