"""Benchmark: taxonomy class matching across datasets, scores on held-out data, table and plot."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope.fewshot.bench import match_classes, plot_curve, results_table, run_benchmark


def test_match_classes_through_the_taxonomy():
    m = match_classes(["neutrophil", "lymphocyte", "platelet"],
                      ["neutrophil_band", "neutrophil_segmented", "lymphocyte", "smudge"])
    assert m.test_to_shared == {"neutrophil_band": "neutrophil", "neutrophil_segmented": "neutrophil",
                                "lymphocyte": "lymphocyte"}
    assert m.unmatched_test == ["smudge"] and m.unmatched_train == ["platelet"]
    # the finer side may be the training side too
    m2 = match_classes(["neutrophil_band", "neutrophil_segmented", "monocyte"], ["neutrophil", "monocyte"])
    assert m2.train_to_shared == {"neutrophil_band": "neutrophil", "neutrophil_segmented": "neutrophil",
                                  "monocyte": "monocyte"}
    assert m2.shared == ["monocyte", "neutrophil"]


def _table(root):
    from hematoscope.data.readers import read_dataset

    return read_dataset(root)


def test_heldout_benchmark_beats_chance(synthetic_root, lite0_extractor, tmp_path):
    res = run_benchmark(_table(synthetic_root), lite0_extractor, shots=[1, 3], heads=["lr", "proto+self"],
                        repeats=2, test_fraction=0.3, progress=False)
    assert res["n_test"] == 8 * round(12 * 0.3) and len(res["classes_scored"]) == 8
    rows = {(r["shots"], r["head"]): r for r in res["results"]}
    assert set(rows) == {(1, "lr"), (1, "proto+self"), (3, "lr"), (3, "proto+self")}
    assert rows[(3, "lr")]["n_train"] == 24 and len(rows[(3, "lr")]["balanced_accuracy"]) == 2
    # synthetic cell types are easy: ImageNet features must do far better than chance (1/8)
    assert rows[(3, "lr")]["balanced_accuracy_mean"] > 0.5
    assert "| lr |" in results_table(res)
    png = plot_curve(res, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cross_dataset_scores_only_shared_classes(synthetic_root, lite0_extractor):
    table = _table(synthetic_root)
    train = table[table["label"] != "platelet"]
    test = table.copy()
    test.loc[test["label"] == "neutrophil", "canonical"] = "neutrophil_band"  # finer labels on the test side
    test.loc[test["label"] == "basophil", ["label", "canonical"]] = ["smudge", None]  # unknown to the taxonomy
    res = run_benchmark(train, lite0_extractor, test=test, shots=[2], heads=["knn"], repeats=1, progress=False)
    assert res["unmatched_test_classes"] == ["platelet", "smudge"]
    assert "neutrophil" in res["classes_scored"] and "basophil" not in res["classes_scored"]
    assert res["n_test"] == 12 * 6
    with pytest.raises(ValueError, match="no class in common"):
        run_benchmark(train[train["label"] == "monocyte"].assign(canonical="monocyte"), lite0_extractor,
                      test=test[test["label"] == "lymphocyte"], shots=[1], heads=["lr"], repeats=1, progress=False)
