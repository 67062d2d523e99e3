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
    first = (table.groupby("label").cumcount() < 6).to_numpy()  # a file is never on both sides
    train = table[first & (table["label"] != "platelet").to_numpy()]
    test = table[~first].copy()
    test.loc[test["label"] == "neutrophil", "canonical"] = "neutrophil_band"  # finer labels on the test side
    test.loc[test["label"] == "basophil", ["label", "canonical"]] = ["smudge", None]  # unknown to the taxonomy
    res = run_benchmark(train, lite0_extractor, test=test, shots=[2], heads=["knn"], repeats=1, progress=False)
    assert res["unmatched_test_classes"] == ["platelet", "smudge"]
    assert "neutrophil" in res["classes_scored"] and "basophil" not in res["classes_scored"]
    assert res["n_test"] == 6 * 6 and res["n_pool_dropped_overlap"] == 0
    with pytest.raises(ValueError, match="no class in common"):
        run_benchmark(train[train["label"] == "monocyte"].assign(canonical="monocyte"), lite0_extractor,
                      test=test[test["label"] == "lymphocyte"], shots=[1], heads=["lr"], repeats=1, progress=False)


class _Recording:
    """Wraps an extractor and records the paths of each ``extract`` call (first = the test set)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def extract(self, paths, **kw):
        self.calls.append(list(paths))
        return self.inner.extract(paths, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _grouped(root, per_group=3):
    """The synthetic table with ``per_group`` consecutive images of a class sharing a patient id."""
    table = _table(root)
    table["patient"] = [f"{lab}-{i // per_group}" for lab, i in zip(table["label"], table.groupby("label").cumcount())]
    return table


def test_grouped_benchmark_never_splits_a_group_and_draws_distinct_groups(synthetic_root, lite0_extractor):
    table = _grouped(synthetic_root)
    group_of = dict(zip(table["path"], table["patient"]))
    rec = _Recording(lite0_extractor)
    res = run_benchmark(table, rec, shots=[2], heads=["lr"], repeats=1, test_fraction=0.25, progress=False)
    assert res["group_by"] == "patient" and "by patient" in res["test_source"]
    test_groups = {group_of[p] for p in rec.calls[0]}
    drawn = [p for call in rec.calls[1:] for p in call]
    assert len(test_groups) == 8  # one whole cell of each class held out
    assert not test_groups & {group_of[p] for p in drawn}
    per_class: dict[str, set] = {}
    for p in drawn:
        per_class.setdefault(group_of[p].split("-")[0], set()).add(group_of[p])
    assert len(drawn) == 16 and all(len(g) == 2 for g in per_class.values())  # 2 cells per class, 1 crop each
    # every test image is scored, and grouping can be switched off
    assert res["n_test"] == len(rec.calls[0]) == 8 * 3
    off = run_benchmark(table, lite0_extractor, shots=[1], heads=["lr"], repeats=1, test_fraction=0.25,
                        group_by=None, progress=False)
    assert off["group_by"] is None


def test_separate_test_table_drops_shared_files_and_groups_from_the_pool(synthetic_root, lite0_extractor):
    table = _grouped(synthetic_root)
    first = (table.groupby("label").cumcount() < 3).to_numpy()  # group 0 of each class
    test = table[first]
    train = table.copy()  # holds the test files themselves (and so their groups)
    res = run_benchmark(train, lite0_extractor, test=test, shots=[1], heads=["svm+self"], repeats=1,
                        max_pool_per_class=None, progress=False)
    assert res["n_pool_dropped_overlap"] == 8 * 3 and res["n_pool"] == 8 * 9 and res["n_pool_groups"] == 8 * 3
    # a group id alone (different files) is enough to drop a pool image
    other = table[~first].copy()
    other.loc[other.groupby("label").cumcount().to_numpy() < 3, "patient"] = \
        [f"{lab}-0" for lab in other.loc[other.groupby("label").cumcount().to_numpy() < 3, "label"]]
    res2 = run_benchmark(other, lite0_extractor, test=test, shots=[1], heads=["lr"], repeats=1, progress=False)
    assert res2["n_pool_dropped_overlap"] == 8 * 3 and res2["n_pool"] == 8 * 6


def test_split_file_gives_pool_and_test(synthetic_root, lite0_extractor, tmp_path):
    from hematoscope.data.splits import load_split, make_split, save_split

    table = _grouped(synthetic_root)
    path = save_split(make_split(table, val=0.0, test=0.25, seed=0, group_by="patient"), tmp_path / "split.csv")
    split = load_split(path)
    res = run_benchmark(split, lite0_extractor, shots=[1], heads=["knn"], repeats=2, progress=False)
    assert res["test_source"].startswith("test rows of the split file")
    assert res["n_test"] == int((split["split"] == "test").sum()) and res["n_pool_dropped_overlap"] == 0
