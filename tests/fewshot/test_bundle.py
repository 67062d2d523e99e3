"""Few-shot bundles: fit, calibrate, save/load (dir and zip), predict and evaluate like any bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hematoscope.bundle import load_bundle
from hematoscope.bundle.base import BundleError
from hematoscope.fewshot.bundle import BACKBONE_DIR, BACKBONE_FILE, HEAD_FILE, FewShotBundle, fit_fewshot_bundle
from hematoscope.fewshot.features import load_extractor


@pytest.fixture(scope="module")
def fitted(synthetic_root, lite0_extractor, tmp_path_factory):
    from hematoscope.data.readers import read_dataset

    bundle, report = fit_fewshot_bundle(read_dataset(synthetic_root), lite0_extractor, labels_per_class=5,
                                        head="svm", seed=0, progress=False)
    path = bundle.save(tmp_path_factory.mktemp("fs") / "bundle")
    return bundle, report, path


def test_fit_draws_exact_counts_and_calibrates(fitted):
    bundle, report, path = fitted
    assert report["n_train"] == 40 and set(bundle.config.training.per_class.values()) == {5}
    assert bundle.config.ood is not None and bundle.config.ood.method == "knn"
    assert bundle.config.temperature > 0 and 0 < bundle.config.abstain_threshold <= 1
    assert 0 <= report["val_balanced_accuracy"] <= 1 and bundle.metrics["n_val"] == 8 * 7
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["kind"] == "fewshot" and cfg["model"]["backbone"]["weights"] == "hematoscope-simclr-pbc"
    assert (path / HEAD_FILE).exists() and not (path / BACKBONE_FILE).exists()  # packaged weights: by name


def test_round_trip_and_predict_paths(fitted, synthetic_root):
    bundle, _, path = fitted
    loaded = load_bundle(path)
    assert isinstance(loaded, FewShotBundle) and loaded.labels == bundle.labels
    files = sorted(str(p) for p in synthetic_root.rglob("*.png"))[::12]
    a, b = bundle.predict(files), loaded.predict(files)
    np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.ood_score, b.ood_score, rtol=1e-5)
    assert a.predicted == b.predicted and len(a) == 8
    np.testing.assert_allclose(a.probs.sum(1), 1, rtol=1e-6)
    zipped = load_bundle(bundle.save(path.parent / "bundle.zip"))
    np.testing.assert_allclose(zipped.predict(files).probs, a.probs, rtol=1e-5, atol=1e-6)


def test_tampered_head_is_refused(fitted, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from hematoscope.bundle.base import BundleError

    _, _, path = fitted
    copy = shutil.copytree(path, tmp_path / "b")
    arrays = load_file(str(copy / HEAD_FILE))
    arrays["targets"] = np.roll(arrays["targets"], 1)
    save_file(arrays, str(copy / HEAD_FILE))
    with pytest.raises(BundleError, match="reproduce"):
        load_bundle(copy)


def test_predict_and_evaluate_commands(fitted, synthetic_root, tmp_path):
    from typer.testing import CliRunner

    from hematoscope.cli.main import app

    _, _, path = fitted
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(app, ["predict", "--model", str(path), str(synthetic_root / "monocyte"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists() and len(out.read_text().splitlines()) == 13
    r = CliRunner().invoke(app, ["evaluate", str(path), str(synthetic_root), "--json", str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "ev.json").read_text())
    assert "balanced_accuracy" in json.dumps(report)


def test_file_weights_are_copied_and_bundle_backbones_nested(tiny_weights, tiny_arch, tiny_neural_bundle,
                                                              synthetic_root, tmp_path):
    import shutil

    from hematoscope.data.images import load_image

    files = sorted(synthetic_root.rglob("*.png"))[::6]
    imgs = [load_image(p) for p in files]
    y = ["immature_granulocyte" if p.parent.name == "ig" else p.parent.name for p in files]
    weights = shutil.copy(tiny_weights[0], tmp_path / "w.safetensors")
    for ext, marker in [(load_extractor(tiny_arch, weights=weights, size=32), BACKBONE_FILE),
                        (load_extractor(tiny_neural_bundle), BACKBONE_DIR)]:
        bundle = FewShotBundle.fit(ext, ext.embed_arrays(imgs), y, head="lr")
        path = bundle.save(tmp_path / marker.split(".")[0])
        assert (path / marker).exists()
        weights.unlink(missing_ok=True)  # the bundle must not need the original weights file
        loaded = load_bundle(path)
        np.testing.assert_allclose(loaded.forward(imgs[:3]).logits, bundle.forward(imgs[:3]).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("labels_per_class, per_class", [(10, None), (1, 2)])
def test_with_nothing_left_for_validation_trust_is_cross_fitted_on_the_labels(synthetic_root, lite0_extractor,
                                                                               labels_per_class, per_class):
    """A lab that labelled only the cells it trains on still gets an OOD flag (noise is not
    answered) and a threshold set on distances of held-out labels, not zero-distance ones."""
    from hematoscope.data.readers import read_dataset

    table = read_dataset(synthetic_root)
    if per_class:
        table = table.groupby("label").head(per_class).reset_index(drop=True)
    bundle, report = fit_fewshot_bundle(table, lite0_extractor, labels_per_class=labels_per_class, head="proto",
                                        progress=False)
    assert bundle.config.ood is not None and bundle.ood.threshold > 0
    assert ("cross-fitted" if labels_per_class > 1 else "leave-one-out") in report["trust"]["split"]
    assert report["trust"]["val_ood_accept_rate"] == pytest.approx(0.95, abs=0.1)  # 8 images: 7 of 8 at least
    if labels_per_class == 1:  # no held-out answer to fit a temperature on; the report agrees
        assert bundle.config.temperature == 1.0 == bundle.metrics["calibration"]["temperature"]
        assert bundle.metrics["calibration"]["ece_after"] == pytest.approx(bundle.metrics["calibration"]["ece_before"])
    noise = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(4)]
    assert bundle.predict(noise).abstain.all()
    cells = read_dataset(synthetic_root)["path"].tolist()[1::7]
    assert bundle.predict(cells).ood_flag.mean() < 0.5


def test_one_label_per_class_with_validation_left_gets_a_working_flag(synthetic_root, lite0_extractor):
    """1 label per class: the flag's neighbour is the nearest one (a 10th does not exist), so
    cells are accepted and noise is not."""
    # the folder itself, as the CLI takes it (a path raised a TypeError deep in the draw)
    bundle, report = fit_fewshot_bundle(synthetic_root, lite0_extractor, labels_per_class=1, head="proto",
                                        progress=False)
    assert report["trust"]["split"] == "val" and bundle.ood.k == 1
    assert bundle.view_mode == str(lite0_extractor.views)  # what predict / evaluate report: the backbone's views
    assert 0.85 <= report["trust"]["val_ood_accept_rate"] <= 1
    noise = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(4)]
    assert bundle.predict(noise).ood_flag.all()


def test_rows_without_a_label_are_unlabelled_crops_never_drawn(synthetic_root, lite0_extractor):
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.samples import DatasetError, require_labels

    table = read_dataset(synthetic_root)
    blank = table.index[::3]
    table.loc[blank, "label"], table.loc[blank, "canonical"] = None, None
    bundle, report = fit_fewshot_bundle(table, lite0_extractor, labels_per_class=None, head="lr+self",
                                        unlabelled_per_class=0, progress=False)
    assert report["n_train"] + report["n_unlabelled"] <= len(table)
    assert report["n_unlabelled"] == len(blank) and "None" not in bundle.labels and "nan" not in bundle.labels
    with pytest.raises(DatasetError, match=f"{len(blank)} of {len(table)} images have no label"):
        require_labels(table, "training")


def test_self_training_head_on_a_bundle_backbone_with_its_views_and_groups(tiny_neural_bundle, synthetic_root,
                                                                           tmp_path):
    """A neural bundle as backbone: its own view count, its checked ONNX copy saved with the
    few-shot bundle, group-aware label / validation draws; the saved bundle predicts the same."""
    from hematoscope.data.readers import read_dataset

    table = read_dataset(synthetic_root)
    table["patient"] = [f"{lab}-{i // 2}" for lab, i in zip(table["label"], table.groupby("label").cumcount())]
    source = load_bundle(tiny_neural_bundle)
    source.set_tta(2)
    ext = load_extractor(tiny_neural_bundle, bundle=source)
    assert ext.views == 2 and ext.active_backend == "onnx"  # exported once into the feature cache
    # 6 cells of 2 crops per class: 2 labelled cells, 2 validation cells, 2 left for unlabelled crops
    bundle, report = fit_fewshot_bundle(table, ext, labels_per_class=2, val_per_class=2, head="svm+self",
                                        unlabelled_per_class=3, progress=False)
    assert report["group_by"] == "patient" and report["n_train"] == 16 and report["n_train_groups"] == 16
    assert report["n_unlabelled"] == 8 * 3 and bundle.config.model.views == 2
    path = bundle.save(tmp_path / "fs")
    assert (path / BACKBONE_DIR / "model.onnx").is_file()
    from safetensors.numpy import load_file

    arrays = load_file(str(path / HEAD_FILE))  # self-training's final labels: no iterations at load
    assert (arrays["targets"] == -1).sum() == 24 and len(arrays["transduction"]) == len(arrays["targets"])
    loaded = load_bundle(path)
    assert loaded.extractor.views == 2 and loaded.extractor.active_backend == "onnx"
    files = sorted(str(p) for p in synthetic_root.rglob("*.png"))[::12]
    pred = loaded.predict(files)
    np.testing.assert_allclose(pred.probs, bundle.predict(files).probs, rtol=1e-4, atol=1e-5)
    assert loaded.views_per_image == 2 and set(pred.views) == {2}  # the views column says what was run
    loaded.set_tta(2)  # predict --tta with the count it runs: nothing to change
    with pytest.raises(BundleError, match="2 views, fixed when it was made"):
        loaded.set_tta(1)  # was accepted and ignored


def test_default_alias_is_the_shipped_model():
    from hematoscope.fewshot.features import BundleFeatureExtractor
    from hematoscope.bundle.default import DefaultModelMissing, default_bundle_path, load_default_bundle

    try:
        shipped = load_default_bundle()
    except DefaultModelMissing as exc:
        pytest.skip(str(exc))
    ext = load_extractor("default")
    assert isinstance(ext, BundleFeatureExtractor) and ext.bundle.path == default_bundle_path()
    assert ext.views == shipped.config.tta and ext.preprocess == shipped.preprocess
    assert ext.active_backend == ("onnx" if (default_bundle_path() / "model.onnx").is_file() else "torch")
    assert load_extractor("default", tta=False).views == 1
