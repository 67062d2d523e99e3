import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hematoscope.trust import fit_trust, ood_metrics, risk_coverage
from hematoscope.trust.evaluation import evaluate_ood


def test_risk_coverage_hand_made_example():
    rc = risk_coverage(np.array([0.6, 0.9, 0.5, 0.8, 0.7]), np.array([1, 1, 0, 1, 0], bool))
    # sorted by confidence: right, right, wrong, right, wrong
    assert rc["coverage"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rc["accuracy"] == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    assert rc["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4 + 2 / 5) / 5)
    assert rc["accuracy_at_coverage"]["0.8"] == pytest.approx(0.75)
    assert rc["accuracy_at_90_coverage"] == pytest.approx(0.6)  # ceil(0.9 * 5) = all 5 images
    assert rc["accuracy_at_coverage"]["0.5"] == pytest.approx(2 / 3)
    assert rc["threshold"] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])


def test_risk_coverage_accepts_tied_confidences_together():
    rc = risk_coverage(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]))
    assert rc["coverage"] == pytest.approx([2 / 3, 1.0]) and rc["accuracy"] == pytest.approx([0.5, 2 / 3])
    assert rc["aurc"] == pytest.approx((0.5 * 2 + 1 / 3) / 3)


def test_ood_metrics_hand_made_example():
    m = ood_metrics(np.array([0.0, 1, 2, 3]), np.array([2.5, 4, 5]))
    assert m["auroc"] == pytest.approx(11 / 12)  # only 2.5 < 3 is out of order
    assert m["fpr_at_95_tpr"] == pytest.approx(1 / 3)  # accepting all 4 in-dist also accepts 2.5
    perfect = ood_metrics(np.arange(10.0), np.arange(10.0) + 100)
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0
    with pytest.raises(ValueError):
        ood_metrics(np.array([]), np.array([1.0]))


def _write_images(folder, images):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")


def test_evaluate_ood_on_toy_bundle_separates_non_cells(toy, kit, tmp_path):
    bundle, train, val, test = toy
    fit_trust(bundle, train=(bundle.forward(train[0]), train[1]), val=(bundle.forward(val[0]), val[1]))
    for c, label in enumerate(bundle.labels):
        _write_images(tmp_path / "in" / label, [im for im, y in zip(*test) if y == c])
    _write_images(tmp_path / "ood", kit.not_cells(30, 4))
    (tmp_path / "ood" / "broken.png").write_bytes(b"not a png")
    report = evaluate_ood(bundle, tmp_path / "in", tmp_path / "ood", plots_dir=tmp_path / "plots")
    assert report["ood"]["auroc"] > 0.95 and report["n_in"] == 60 and report["n_ood"] == 30
    assert report["skipped"] == 1 and report["at_threshold"]["ood_flag_rate"] > 0.9
    assert report["accuracy"] > 0.9
    for name in ("ood_scores.png", "risk_coverage.png", "reliability.png", "trust_eval.json"):
        assert (tmp_path / "plots" / name).stat().st_size > 0


def test_trust_cli_fit_eval_make_ood_on_tiny_neural_bundle(tiny_neural_bundle, synthetic_root, tmp_path):
    from hematoscope.bundle.base import load_bundle
    from hematoscope.cli.main import app
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split

    runner = CliRunner()
    split = save_split(make_split(read_dataset(synthetic_root), val=0.25, test=0.25, seed=0), tmp_path / "split.csv")
    bundle_dir = tmp_path / "bundle"
    res = runner.invoke(app, ["trust", "fit", str(tiny_neural_bundle), str(split), "--method", "knn",
                              "--target-tpr", "0.9", "--out", str(bundle_dir)])
    assert res.exit_code == 0, res.output
    assert "temperature" in res.output and "accepts" in res.output
    cfg = json.loads((bundle_dir / "config.json").read_text())
    assert cfg["ood"]["method"] == "knn" and cfg["ood"]["target_tpr"] == 0.9
    assert load_bundle(bundle_dir).ood.bank_.shape[0] == 48  # the train rows (half of 96)

    res = runner.invoke(app, ["trust", "make-ood", "not_cells", str(tmp_path / "ood"), "--n", "10", "--size", "64"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["trust", "eval", str(bundle_dir), str(split), "--ood", str(tmp_path / "ood"),
                              "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval" / "trust_eval.json").read_text())
    assert report["n_ood"] == 10 and report["n_in"] == 24  # the split's test rows
    assert 0 <= report["ood"]["auroc"] <= 1 and "AUROC" in res.output

    res = runner.invoke(app, ["trust", "fit", str(bundle_dir), str(split), "--method", "bogus"])
    assert res.exit_code == 2 and "isolation_forest" in res.output  # every registered scorer is offered
    res = runner.invoke(app, ["trust", "eval", str(tmp_path / "nope"), str(split), "--ood", str(tmp_path / "ood"),
                              "--out", str(tmp_path / "e2")])
    assert res.exit_code == 2 and "no bundle" in res.output


def test_trust_eval_scores_what_predict_and_evaluate_answer(tmp_path):
    """trust eval ran fixed whole-crop views while predict and evaluate run the cascade and the
    framing search: its accuracy and abstain rate disagreed with evaluate's on the same rows."""
    from PIL import Image

    from hematoscope.bundle import load_bundle
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR
    from hematoscope.data.readers import read_dataset
    from hematoscope.evaluate import evaluate_bundle
    from hematoscope.samples import sample_paths
    from hematoscope.trust.evaluation import evaluate_ood

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the package has no default model")
    bundle = load_bundle("default")
    table = read_dataset(sample_paths()[0].parent.parent)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / f"noise_{i}.png")
    trust = evaluate_ood(bundle, table, tmp_path)
    plain = evaluate_bundle(bundle, table)
    assert trust["views"] == plain["views"] == "cascade"
    assert trust["accuracy"] == pytest.approx(plain["accuracy"]) and trust["n_in"] == plain["n"]
    assert trust["abstain"]["in_abstain_rate"] == pytest.approx(plain["abstained"])
