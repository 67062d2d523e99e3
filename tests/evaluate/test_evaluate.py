"""Taxonomy-aware evaluation of a bundle on another dataset's labels, plots and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.bundle.neural import NeuralBundle
from hematoscope.cli.main import app
from hematoscope.data.samples import make_table
from hematoscope.evaluate import evaluate_bundle
from hematoscope.models.preprocess import Preprocess


def _files(root, folder, n):
    return sorted(str(p) for p in (root / folder).iterdir())[:n]


def _bundle(labels):
    torch.manual_seed(0)
    return NeuralBundle.create(labels, preprocess=Preprocess(size=32), weights=None, name="eval-test")


def test_other_dataset_labels_are_matched_through_the_taxonomy(synthetic_root, tmp_path):
    bundle = _bundle(["neutrophil", "lymphocyte", "monocyte"])
    rows = ([{"path": p, "label": "SNE"} for p in _files(synthetic_root, "neutrophil", 4)]
            + [{"path": p, "label": "lymphocytes"} for p in _files(synthetic_root, "lymphocyte", 3)]
            + [{"path": p, "label": "basophil"} for p in _files(synthetic_root, "basophil", 2)]
            + [{"path": p, "label": "alien blob"} for p in _files(synthetic_root, "platelet", 1)])
    table = make_table(rows, dataset="other")
    report = evaluate_bundle(bundle, table, plots_dir=tmp_path / "plots")

    assert report["label_map"] == {"neutrophil_segmented": "neutrophil", "lymphocyte": "lymphocyte"}
    assert report["unknown_classes"] == {"basophil": 2, "alien blob": 1}
    assert report["n"] == 7 and report["labels"] == ["neutrophil", "lymphocyte", "monocyte"]
    scored = rows[:7]
    pred = bundle.predict([r["path"] for r in scored]).probs.argmax(1)
    truth = np.array([0] * 4 + [1] * 3)
    from sklearn.metrics import accuracy_score, confusion_matrix

    assert report["confusion_matrix"] == confusion_matrix(truth, pred, labels=[0, 1, 2]).tolist()
    assert report["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    for name in ("confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finer_bundle_classes_merge_into_the_datas_coarser_class(synthetic_root):
    bundle = _bundle(["neutrophil_segmented", "neutrophil_band", "lymphocyte"])
    rows = ([{"path": p, "label": "neutrophil"} for p in _files(synthetic_root, "neutrophil", 3)]
            + [{"path": p, "label": "lymphocyte"} for p in _files(synthetic_root, "lymphocyte", 3)])
    report = evaluate_bundle(bundle, make_table(rows, dataset="other"))
    assert report["labels"] == ["neutrophil", "lymphocyte"]
    assert report["merged"] == {"neutrophil_segmented": "neutrophil", "neutrophil_band": "neutrophil"}
    probs = bundle.predict([r["path"] for r in rows]).probs
    merged_pred = np.where(probs[:, :2].sum(1) >= probs[:, 2], 0, 1)
    assert np.trace(np.array(report["confusion_matrix"])) == int((merged_pred == np.array([0] * 3 + [1] * 3)).sum())


def test_no_known_class_is_a_clear_error(synthetic_root):
    bundle = _bundle(["neutrophil", "lymphocyte"])
    table = make_table([{"path": p, "label": "platelet"} for p in _files(synthetic_root, "platelet", 2)], "other")
    with pytest.raises(ValueError, match="none of the data's classes"):
        evaluate_bundle(bundle, table)


def test_cli_evaluate_writes_json_and_plots(tiny_neural_bundle, synthetic_root, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", str(tiny_neural_bundle), str(synthetic_root),
                                      "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 96 and len(report["per_class"]) == 8
    assert (report["model"], report["data"], report["rows"]) == (load_bundle(tiny_neural_bundle).name,
                                                                 synthetic_root.name, "all")
    assert "balanced accuracy" in _flat(result.output) and "neutrophil" in _flat(result.output)
    assert (tmp_path / "p" / "confusion_matrix.png").is_file()


def test_cli_evaluate_missing_bundle_is_a_clean_error(synthetic_root, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope"), str(synthetic_root)])
    assert result.exit_code == 2 and "no bundle" in _flat(result.output)


def test_cli_evaluate_with_ood_images(tiny_neural_bundle, synthetic_root, tmp_path):
    from PIL import Image

    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(noise / f"n{i}.png")
    result = CliRunner().invoke(app, ["evaluate", str(tiny_neural_bundle), str(synthetic_root),
                                      "--ood", str(noise), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ood"]["n_ood"] == 6 and report["ood"]["n_in"] == 96


def test_a_split_file_without_test_rows_is_not_scored_whole(tiny_neural_bundle, synthetic_root, tmp_path):
    """A training run's split.csv holds only the rows that trained or tuned the model: scoring
    them all by default would report training accuracy; a part must be named."""
    import pandas as pd

    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split

    save_split(make_split(read_dataset(synthetic_root), val=0.25, test=0.0, seed=0), tmp_path / "split.csv")
    refused = CliRunner().invoke(app, ["evaluate", str(tiny_neural_bundle), str(tmp_path / "split.csv")])
    assert refused.exit_code == 2 and "has no test rows" in _flat(refused.output.replace("│", " "))
    for part, n in (("val", 24), ("all", 96)):
        r = CliRunner().invoke(app, ["evaluate", str(tiny_neural_bundle), str(tmp_path / "split.csv"), "--split", part,
                                     "--json", str(tmp_path / f"{part}.json")])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / f"{part}.json").read_text())["n"] == n
    assert len(pd.read_csv(tmp_path / "split.csv")) == 96


def test_a_k_fold_file_is_scored_by_naming_one_of_its_folds(tiny_neural_bundle, synthetic_root, tmp_path):
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import kfold_split, save_split

    save_split(kfold_split(read_dataset(synthetic_root), k=4, seed=0), tmp_path / "folds.csv")
    refused = CliRunner().invoke(app, ["evaluate", str(tiny_neural_bundle), str(tmp_path / "folds.csv")])
    said = _flat(refused.output.replace("│", " "))
    assert refused.exit_code == 2 and "fold_0, fold_1, fold_2, fold_3" in said and "--split fold_3" in said
    wrong = CliRunner().invoke(app, ["evaluate", str(tiny_neural_bundle), str(tmp_path / "folds.csv"), "--split", "val"])
    assert wrong.exit_code == 2 and "fold_0" in _flat(wrong.output.replace("│", " "))
    r = CliRunner().invoke(app, ["evaluate", str(tiny_neural_bundle), str(tmp_path / "folds.csv"), "--split", "fold_1",
                                 "--json", str(tmp_path / "f1.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "f1.json").read_text())["rows"] == "fold_1"


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_a_model_that_sets_every_image_aside_says_so(tiny_neural_bundle, synthetic_root, tmp_path):
    """With nothing answered there is no accuracy on the answered: the abstention line was
    dropped with it, and 100 % set aside went unsaid."""
    bundle = load_bundle(tiny_neural_bundle)
    bundle.config.abstain_threshold = 1.0  # a cut no answer reaches
    bundle.config.view_trust = {}
    path = bundle.save(tmp_path / "cautious")
    result = CliRunner().invoke(app, ["evaluate", str(path), str(synthetic_root), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["abstained"] == 1.0
    assert "abstained: 100.0% (every image)" in _flat(result.output)
