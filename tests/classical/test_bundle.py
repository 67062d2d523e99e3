"""The classical bundle: round trip, use through the generic Bundle API and CLI, anomaly flag."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from hematoscope.bundle import load_bundle
from hematoscope.bundle.prediction import UNLIKE_TRAINING


def _real_images(pbc_subset, per_class=2):
    files = []
    for d in sorted(p for p in pbc_subset.iterdir() if p.is_dir()):
        files += sorted(d.glob("*.jpg"))[:per_class]
    return files


def _not_cells(size=128) -> dict[str, np.ndarray]:
    """Images that are not blood cells: noise, a flat slide, text, a natural texture, a photo."""
    from skimage import data

    rng = np.random.default_rng(0)
    text = Image.new("RGB", (size, size), (250, 250, 245))
    d = ImageDraw.Draw(text)
    for row in range(8):
        d.text((4, 4 + row * 15), "Lorem ipsum dolor sit amet"[row:row + 18], fill=(20, 20, 60))
    grass = data.grass()[:size * 2:2, :size * 2:2]
    texture = np.stack([grass * 0.5, grass * 0.8, grass * 0.3], -1).astype(np.uint8)
    return {
        "noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "flat": np.full((size, size, 3), (235, 215, 200), np.uint8),
        "text": np.asarray(text),
        "texture": texture,
        "photo": np.ascontiguousarray(data.chelsea()[:256, 100:356]),
    }


def test_round_trip_identical(tiny_classical_bundle, pbc_subset, tmp_path):
    bundle = load_bundle(tiny_classical_bundle)
    assert bundle.kind == "classical" and len(bundle.labels) == 8
    assert bundle.config.ood.method == "isolation_forest"
    files = _real_images(pbc_subset, 1)
    first = bundle.predict(files)
    zipped = bundle.save(tmp_path / "b.zip")
    again = load_bundle(zipped).predict(files)
    np.testing.assert_array_equal(first.probs, again.probs)
    np.testing.assert_array_equal(first.ood_score, again.ood_score)
    assert np.allclose(first.probs.sum(1), 1)


def test_learns_real_cells(tiny_classical_bundle, pbc_subset):
    # Trained on 4 images per class: it must at least fit them clearly better than chance (1/8).
    bundle = load_bundle(tiny_classical_bundle)
    files = _real_images(pbc_subset, 3)
    pred = bundle.predict(files)
    from hematoscope.taxonomy import TAXONOMY

    expected = [TAXONOMY.canonical("folder", f.parent.name) for f in files]
    assert np.mean([p == e for p, e in zip(pred.predicted, expected)]) > 0.6


def test_non_cells_are_flagged(tiny_classical_bundle, pbc_subset):
    bundle = load_bundle(tiny_classical_bundle)
    odd = _not_cells()
    out = bundle.predict(list(odd.values()), sources=list(odd))
    cells = bundle.predict(_real_images(pbc_subset, 3))
    assert out.ood_score.min() > np.median(cells.ood_score)
    assert out.ood_flag.sum() >= len(odd) - 1, dict(zip(odd, out.ood_score.round(3)))
    assert cells.ood_flag.mean() <= 0.25
    assert all(r == UNLIKE_TRAINING for r, f in zip(out.abstain_reason, out.ood_flag) if f)


def test_anomaly_scorer_reload_is_exact(tmp_path):
    from hematoscope.classical.anomaly import IsolationForestScorer
    from hematoscope.trust import load_scorer

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    x[::10, 2] = np.nan
    scorer = IsolationForestScorer(n_estimators=50, max_train=200).fit(x, None, None)
    scorer.threshold = 0.5
    scorer.save(tmp_path)
    again = load_scorer(scorer.config(), tmp_path)
    probe = np.vstack([x[:20], rng.normal(5, 1, size=(5, 6))])
    np.testing.assert_array_equal(scorer.score(features=probe, logits=None), again.score(features=probe, logits=None))
    s = again.score(features=probe, logits=None)
    assert s[20:].min() > np.median(s[:20])
    # A missing value is treated as unlike training, not as average.
    nan_row = x[:1].copy()
    nan_row[0, :3] = np.nan
    assert again.score(features=nan_row, logits=None)[0] > again.score(features=x[:1], logits=None)[0]


def test_feature_version_mismatch_is_refused(tiny_classical_bundle, tmp_path):
    import shutil

    from hematoscope.bundle import BundleError

    copy = tmp_path / "old"
    shutil.copytree(tiny_classical_bundle, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model"]["feature_version"] = "0"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="feature set v0"):
        load_bundle(copy)


def test_cli_train_segment_explain(pbc_subset, tmp_path):
    from hematoscope.cli.main import app

    runner = CliRunner()
    out = tmp_path / "bundle"
    res = runner.invoke(app, ["classical", "train", str(pbc_subset), "--out", str(out), "--val", "0.34",
                              "--jobs", "1"])
    assert res.exit_code == 0, res.output
    assert "weighted F1" in res.output and (out / "xgboost.json").exists()
    trained = (out / "xgboost.json").read_bytes()
    res = runner.invoke(app, ["classical", "train", str(pbc_subset), "--out", str(out), "--jobs", "1"])
    assert res.exit_code == 2 and "--overwrite" in res.output  # refused before any feature is extracted
    assert (out / "xgboost.json").read_bytes() == trained
    img = _real_images(pbc_subset, 1)[0]
    res = runner.invoke(app, ["classical", "segment", str(img), "--out", str(tmp_path / "ov.png")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "ov.png").size[0] >= 256
    res = runner.invoke(app, ["classical", "explain", str(out), str(img), "--out", str(tmp_path / "ex"),
                              "--samples", "20", "--top", "5"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ex" / "features.json").read_text())
    assert len(report["features"]) == 5 and report["predicted"] in load_bundle(out).labels
    answer = load_bundle(out).predict([str(img)])
    assert report["abstain"] == bool(answer.abstain[0]) and report["abstain_reason"] == answer.abstain_reason[0]
    lime = Image.open(tmp_path / "ex" / "lime.png")
    assert lime.mode == "RGB" and lime.size == Image.open(img).size  # the crop's own shape, not a square
    res = runner.invoke(app, ["classical", "segment", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2


def test_generic_predict_and_evaluate_commands(tiny_classical_bundle, pbc_subset, tmp_path):
    from hematoscope.cli.main import app

    runner = CliRunner()
    out = tmp_path / "pred.json"
    res = runner.invoke(app, ["predict", "--model", str(tiny_classical_bundle), str(pbc_subset / "platelet"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists() and "platelet" in out.read_text()
    res = runner.invoke(app, ["evaluate", str(tiny_classical_bundle), str(pbc_subset), "--json",
                              str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "eval.json").read_text())


def test_edge_bars_are_painted_as_background_in_training_and_prediction(tiny_classical_bundle, lisc_root):
    """A crop cut at the slide's edge is featurised as its filled copy, from a file at training
    time (the disk-cached path) and from an array at prediction time."""
    from hematoscope.classical.features import ClassicalFeatures
    from hematoscope.models.preprocess import fill_bars

    path = lisc_root / "basophil" / "lisc_bas_134.jpg"  # black along its top and left edges
    raw = np.asarray(Image.open(path).convert("RGB"))
    filled = fill_bars(raw)
    assert not np.array_equal(raw, filled)
    bundle = load_bundle(tiny_classical_bundle)
    assert bundle.preprocess.bars == "fill"
    from_arrays = bundle.features([raw, filled])
    np.testing.assert_allclose(from_arrays[0], from_arrays[1], rtol=1e-6)
    trained_on = ClassicalFeatures(n_jobs=1, cache=False).transform([path])[0]
    np.testing.assert_allclose(trained_on, from_arrays[0], rtol=1e-5, atol=1e-6)
    from dataclasses import replace

    unfilled = replace(bundle.preprocess, bars="keep").resize_image(raw)  # as bundles before bars were filled
    kept = ClassicalFeatures(n_jobs=1, cache=False).transform([unfilled])[0]
    assert not np.allclose(kept, from_arrays[0], rtol=1e-3, equal_nan=True)


def test_a_file_and_its_decoded_array_get_the_same_answer(tiny_classical_bundle, pbc_subset):
    """PBC's 256 px JPEGs are twice the classical working size: decoded at half scale (JPEG
    draft mode) they had other features than the same image given as an array, and 7 of 120
    answers changed between the two (a walk-through, 2026-11-30)."""
    from hematoscope.data.images import load_image

    b = load_bundle(tiny_classical_bundle)
    assert b.preprocess.jpeg_draft is False
    files = sorted(pbc_subset.rglob("*.jpg"))[:6]
    by_file, by_array = b.predict(files), b.predict([load_image(f) for f in files])
    np.testing.assert_allclose(by_file.probs, by_array.probs, atol=1e-6)
    np.testing.assert_allclose(by_file.ood_score, by_array.ood_score, atol=1e-6)


def test_cli_train_names_unknown_labels_and_a_class_of_one_image(pbc_subset, tmp_path):
    import shutil

    from hematoscope.cli.main import app

    data = tmp_path / "data"
    shutil.copytree(pbc_subset, data)
    (data / "basophil").rename(data / "basophill")  # a typo: trained as a class of its own, and said so
    res = CliRunner().invoke(app, ["classical", "train", str(data), "--out", str(tmp_path / "b"), "--val", "0.34",
                                   "--jobs", "1"])
    out = " ".join((res.stdout + res.stderr).split())
    assert res.exit_code == 0, out
    assert "the taxonomy does not know, each made a class of the model: 'basophill'" in out
    for extra in sorted((data / "monocyte").iterdir())[1:]:
        extra.unlink()
    res = CliRunner().invoke(app, ["classical", "train", str(data), "--out", str(tmp_path / "c"), "--jobs", "1"])
    out = " ".join((res.stdout + res.stderr).split())
    assert res.exit_code != 0 and "monocyte has 1" in out and "larger --val" not in out
