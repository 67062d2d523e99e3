import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hematoscope.cli.main import app
from hematoscope.data.readers import read_dataset
from hematoscope.data.samples import make_table
from hematoscope.data.splits import (SplitIntegrityError, is_split_file, kfold_split, load_split, make_split,
                                     save_split, verify_split)
from hematoscope.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def patient_root(tmp_path_factory):
    """4 classes × 30 images, ids of 15 patients encoded in a CSV next to the images."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("pat"), classes=["a", "b", "c", "d"], n_per_class=30, size=16)
    return root


def _with_patients(root, n_patients=15):
    table = read_dataset(root, reader="folder")
    table["patient"] = [f"P{i % n_patients}" for i in range(len(table))]
    return table


def test_stratified_split_fractions(synthetic_root):
    df = make_split(read_dataset(synthetic_root, reader="folder"), val=0.25, test=0.25, seed=1)
    counts = df.groupby(["label", "split"]).size().unstack()
    assert (counts["test"] == 3).all() and (counts["val"] == 3).all() and (counts["train"] == 6).all()


def test_small_classes_keep_a_training_image():
    table = make_table([{"path": f"/x/{c}{i}.png", "label": c} for c in "ab" for i in range(3 if c == "a" else 1)], "folder")
    df = make_split(table, val=0.1, test=0.1)
    assert df[df.label == "a"]["split"].value_counts().to_dict() == {"train": 1, "val": 1, "test": 1}
    assert df[df.label == "b"]["split"].tolist() == ["train"]


def test_split_ignores_row_order_and_depends_on_seed(synthetic_root):
    table = read_dataset(synthetic_root, reader="folder")
    a = make_split(table, seed=3)
    b = make_split(table.sample(frac=1, random_state=0), seed=3)
    c = make_split(table, seed=4)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


@pytest.mark.parametrize("kwargs", [{"val": 0.6, "test": 0.5}, {"val": -0.1}, {"group_by": "slide"}])
def test_bad_split_arguments(synthetic_root, kwargs):
    with pytest.raises(ValueError):
        make_split(read_dataset(synthetic_root, reader="folder"), **kwargs)


def test_grouped_split_keeps_each_patient_on_one_side(patient_root):
    df = make_split(_with_patients(patient_root), val=0.2, test=0.2, seed=0, group_by="patient")
    sides = df.groupby("patient")["split"].nunique()
    assert (sides == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    assert 0.1 < (df["split"] == "test").mean() < 0.35


def test_grouped_split_without_ids_warns_and_splits_images(synthetic_root):
    with pytest.warns(UserWarning, match="no 'patient' ids"):
        df = make_split(read_dataset(synthetic_root, reader="folder"), group_by="patient")
    assert set(df["split"]) == {"train", "val", "test"}


def test_kfold_partitions_and_groups(patient_root):
    table = _with_patients(patient_root)
    df = kfold_split(table, k=5, seed=0, group_by="patient")
    assert sorted(df["split"].unique()) == [f"fold_{i}" for i in range(5)]
    assert (df.groupby("patient")["split"].nunique() == 1).all()
    plain = kfold_split(table, k=3, seed=0)
    assert (plain.groupby(["split", "label"]).size() == 10).all()  # stratified: 30/3 per class per fold
    with pytest.raises(ValueError):
        kfold_split(table, k=1)


def test_save_is_byte_identical_and_round_trips(synthetic_root, tmp_path):
    table = read_dataset(synthetic_root, reader="folder")
    p1 = save_split(make_split(table, seed=7), tmp_path / "s1.csv")
    p2 = save_split(make_split(table, seed=7), tmp_path / "s2.csv")
    assert p1.read_bytes() == p2.read_bytes()
    assert is_split_file(p1) and not is_split_file(synthetic_root / "ig" / "ig_0000.png")
    back = load_split(p1)
    assert back["path"].tolist() == sorted(table["path"])
    assert back["canonical"].tolist() == make_split(table, seed=7)["canonical"].tolist()
    assert back["sha256"].str.len().eq(64).all()
    assert read_dataset(p1)["split"].tolist() == back["split"].tolist()


def test_paths_relative_inside_split_folder_absolute_outside(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", classes=["a", "b"], n_per_class=3, size=16)
    df = make_split(read_dataset(root, reader="folder"), val=0, test=0.34)
    inside = pd.read_csv(save_split(df, tmp_path / "split.csv"))
    assert inside["path"].str.startswith("data/").all()
    outside = pd.read_csv(save_split(df, tmp_path / "elsewhere" / "split.csv"))
    assert outside["path"].map(lambda p: p.startswith("/")).all()
    # A folder with data + split file moves as a whole.
    moved = tmp_path.rename(tmp_path.with_name(tmp_path.name + "_moved"))
    assert load_split(moved / "split.csv")["path"].map(lambda p: p.startswith(str(moved))).all()


def test_load_detects_changed_and_missing_files(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", classes=["a", "b"], n_per_class=4, size=16)
    path = save_split(make_split(read_dataset(root, reader="folder")), tmp_path / "split.csv")
    (root / "a" / "a_0000.png").unlink()
    (root / "b" / "b_0001.png").write_bytes((root / "b" / "b_0002.png").read_bytes())
    with pytest.raises(SplitIntegrityError) as err:
        load_split(path)
    assert err.value.missing == [str(root / "a" / "a_0000.png")]
    assert err.value.changed == [str(root / "b" / "b_0001.png")]
    assert "1 file(s) missing" in str(err.value) and "1 file(s) changed" in str(err.value)
    check = verify_split(load_split(path, verify=False))
    assert not check.ok and len(check.missing) == 1


def test_cli_split_and_kfold(synthetic_root, tmp_path):
    runner = CliRunner()
    out = tmp_path / "split.csv"
    res = runner.invoke(app, ["data", "split", str(synthetic_root), "--out", str(out), "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "96 images" in res.output
    df = load_split(out)
    assert df["split"].value_counts().to_dict() == {"train": 80, "val": 8, "test": 8}
    res = runner.invoke(app, ["data", "split", str(synthetic_root), "--out", str(tmp_path / "k.csv"), "--kfold", "4"])
    assert res.exit_code == 0, res.output
    assert load_split(tmp_path / "k.csv")["split"].nunique() == 4
    res = runner.invoke(app, ["data", "split", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())


def test_copies_of_an_image_never_straddle_the_split(tmp_path):
    """A `data check` report's duplicates stay on one side, grouped or not; its unreadable files
    are left out. Copies are planted on purpose so that a plain split spreads them."""
    import json
    import shutil

    root = make_synthetic_dataset(tmp_path / "d", classes=["a", "b"], n_per_class=40, size=16, seed=3)
    files = sorted(root.rglob("*.png"))
    for i, f in enumerate(files[:12]):  # 12 byte-identical copies
        shutil.copy(f, f.parent / f"copy_{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    report = tmp_path / "check.json"
    assert CliRunner().invoke(app, ["data", "check", str(root), "--json", str(report), "--near", "0"]).exit_code == 0
    clusters = [c for c in json.loads(report.read_text())["exact_duplicates"]]
    assert len(clusters) == 12
    plain = make_split(read_dataset(root), val=0.25, test=0.25, seed=0)
    side = dict(zip(plain["path"], plain["split"]))
    assert any(len({side[p] for p in c["paths"]}) > 1 for c in clusters)  # the plain split spreads copies
    every = sorted(root.rglob("*.png"))  # as a CSV with a cell id per pair of crops: copies under other ids
    pd.DataFrame({"path": [str(p) for p in every], "label": [p.parent.name for p in every],
                  "patient": [f"cell{i // 2}" for i in range(len(every))]}).to_csv(tmp_path / "cells.csv", index=False)
    for data, extra in ((root, []), (tmp_path / "cells.csv", ["--group-by", "patient"])):
        out = tmp_path / f"split{len(extra)}.csv"
        res = CliRunner().invoke(app, ["data", "split", str(data), "--out", str(out), "--val", "0.25", "--test", "0.25",
                                       "--check", str(report), *extra])
        assert res.exit_code == 0, res.output
        df = load_split(out)
        side = dict(zip(df["path"], df["split"]))
        assert all(len({side[p] for p in c["paths"]}) == 1 for c in clusters)
        assert not any(p.endswith("broken.png") for p in df["path"]) and len(df) == 92
        if extra:
            assert (df.groupby("patient")["split"].nunique() == 1).all() and "groups merged" in " ".join(res.output.split())


def test_cli_split_groups_by_patient_automatically(patient_root, tmp_path):
    """Data with group ids is split by group, as `train` splits it, unless --group-by none."""
    _with_patients(patient_root).to_csv(tmp_path / "cells.csv", index=False)
    res = CliRunner().invoke(app, ["data", "split", str(tmp_path / "cells.csv"), "--out", str(tmp_path / "s.csv"),
                                   "--val", "0.2", "--test", "0.2"])
    assert res.exit_code == 0, res.output
    assert "grouped by patient automatically" in " ".join(res.output.split())
    assert (load_split(tmp_path / "s.csv").groupby("patient")["split"].nunique() == 1).all()
    res = CliRunner().invoke(app, ["data", "split", str(tmp_path / "cells.csv"), "--out", str(tmp_path / "i.csv"),
                                   "--val", "0.2", "--test", "0.2", "--group-by", "none"])
    assert res.exit_code == 0 and "grouped" not in res.output
    assert (load_split(tmp_path / "i.csv").groupby("patient")["split"].nunique() > 1).any()


def test_cli_split_keeps_the_crops_of_one_lisc_cell_together(lisc_root, tmp_path):
    res = CliRunner().invoke(app, ["data", "split", str(lisc_root), "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    df = load_split(tmp_path / "s.csv", verify=False)
    assert len(df) == 1218 and (df.groupby("patient")["split"].nunique() == 1).all()


def test_cli_split_refuses_a_check_report_of_other_data(tmp_path):
    ours = make_synthetic_dataset(tmp_path / "ours", classes=["a", "b"], n_per_class=8, size=16)
    other = make_synthetic_dataset(tmp_path / "other", classes=["a", "b"], n_per_class=5, size=16, seed=1)
    clean = tmp_path / "clean.json"  # a report that names no file: told apart by its source and count
    assert CliRunner().invoke(app, ["data", "check", str(other), "--json", str(clean)]).exit_code == 0
    (other / "a" / "broken.png").write_bytes(b"not an image")
    named = tmp_path / "named.json"  # names a file that is not in ours
    assert CliRunner().invoke(app, ["data", "check", str(other), "--json", str(named)]).exit_code == 0
    for report in (clean, named):
        res = CliRunner().invoke(app, ["data", "split", str(ours), "--out", str(tmp_path / "s.csv"),
                                       "--check", str(report)])
        text = "".join(res.output.split())  # paths wrap anywhere
        assert res.exit_code == 2 and str(other) in text and str(ours) in text, res.output
        assert not (tmp_path / "s.csv").exists()
    own = tmp_path / "own.json"  # its own report still works, and so does one of the same files as a split CSV
    assert CliRunner().invoke(app, ["data", "check", str(ours), "--json", str(own)]).exit_code == 0
    save_split(make_split(read_dataset(ours), seed=0), tmp_path / "ours.csv")
    for data in (ours, tmp_path / "ours.csv"):
        res = CliRunner().invoke(app, ["data", "split", str(data), "--out", str(tmp_path / "s.csv"), "--check", str(own)])
        assert res.exit_code == 0, res.output


def test_cli_split_leaves_out_unreadable_files_and_says_so(tmp_path):
    """Without --check, files that are plainly no image (a .DS_Store saved as .jpg, a cut JPEG)
    are left out of the split with a warning, not trained on."""
    from PIL import Image

    root = make_synthetic_dataset(tmp_path / "d", classes=["a", "b"], n_per_class=10, size=32)
    (root / "a" / ".DS_Store.jpg").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 2000)
    Image.open(root / "b" / "b_0000.png").save(tmp_path / "whole.jpg", quality=95)
    (root / "b" / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:400])
    res = CliRunner().invoke(app, ["data", "split", str(root), "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert "left out 2 files that cannot be read as images" in " ".join(res.output.split())
    df = load_split(tmp_path / "s.csv")
    assert len(df) == 20 and not df["path"].str.contains("DS_Store|cut").any()


def test_classes_too_small_for_every_part_or_fold_are_named():
    """A one-image class can only be on one side: the split said nothing, and k-fold beyond the
    largest class raised scikit-learn's 'n_splits=20 cannot be greater than ...'."""
    import pandas as pd

    from hematoscope.data.splits import kfold_split, make_split

    table = pd.DataFrame({"path": [f"/d/{c}/{i}.png" for c, n in (("a", 12), ("b", 1)) for i in range(n)],
                          "label": ["a"] * 12 + ["b"]})
    with pytest.warns(UserWarning, match=r"1 class too small to be in every part: b \(1 image: none in val, test\)"):
        make_split(table, val=0.2, test=0.2)
    with pytest.warns(UserWarning, match=r"b \(1 image: none in fold_1, fold_2\)"):
        kfold_split(table, k=3)
    with pytest.raises(ValueError, match=r"the largest class \(a\) has 12 images; use at most 12 folds"):
        kfold_split(table, k=13)  # 13 images, but no class to put in each of 13 folds


def test_cli_split_with_a_check_report_names_an_image_under_two_labels(tmp_path):
    """PBC holds EO_225902 = BNE_191112: kept on one side, but under two labels, one of them wrong."""
    import shutil

    root = make_synthetic_dataset(tmp_path / "d", classes=["a", "b"], n_per_class=10, size=16, seed=3)
    first = sorted((root / "a").glob("*.png"))[0]
    shutil.copy(first, root / "b" / "relabelled.png")
    report = tmp_path / "check.json"
    assert CliRunner().invoke(app, ["data", "check", str(root), "--json", str(report), "--near", "0"]).exit_code == 0
    res = CliRunner().invoke(app, ["data", "split", str(root), "--out", str(tmp_path / "s.csv"), "--check", str(report)])
    said = " ".join((res.stdout + res.stderr).split())
    assert res.exit_code == 0 and f"1 image in the data under two labels (e.g. {first.name} = relabelled.png)" in said
