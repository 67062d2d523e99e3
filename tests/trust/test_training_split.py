"""`trust fit` holds DATA to the split a `hematoscope train` bundle records (its val rows must not
have been trained on), and `trust eval` scores the rows `evaluate` would (--split)."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from hematoscope.cli.main import app


def _flat(text: str) -> str:
    """Console output with rich's wrapping and panel borders undone, spaces dropped (a long path
    may be wrapped anywhere)."""
    return "".join(text.replace("│", "").split())


@pytest.fixture
def run(tiny_neural_bundle, synthetic_root, tmp_path):
    """A training run's layout as `hematoscope train --out run` leaves it: run/split.csv (train and
    val rows of the synthetic folder, seed 0) and run/bundle, whose config records that file's
    sha256 as `train` does."""
    from hematoscope._io import file_sha256
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split

    table = make_split(read_dataset(synthetic_root), val=0.1, test=0.0, seed=0)
    split = save_split(table, tmp_path / "run" / "split.csv")
    bundle = load_bundle(tiny_neural_bundle)
    bundle.config.training = {"recipe": "supervised fine-tuning (hematoscope train)", "config": {"out": "run"},
                              "split_file_sha256": file_sha256(split)}
    bundle.config.data_sources = sorted(set(table["dataset"].dropna()))  # as train records them
    return bundle.save(tmp_path / "run" / "bundle"), split


def _fit(*args):
    return CliRunner().invoke(app, ["trust", "fit", *map(str, args)], env={"COLUMNS": "200"})


def test_a_folder_split_anew_is_refused_naming_the_runs_split(run, synthetic_root, tmp_path):
    """Bug: `trust fit run/bundle data` split the folder 80/10/10 itself; its val images had
    trained the bundle, with only a generic warning."""
    bundle_dir, split = run
    res = _fit(bundle_dir, synthetic_root, "--out", tmp_path / "out")
    said = _flat(res.output)
    assert res.exit_code == 2, res.output
    assert "valimagesofthesplitmadehere" in said and "weretrainingimagesof" in said
    assert "".join(f"hematoscope trust fit {bundle_dir} {split}".split()) in said  # the command to run instead
    assert not (tmp_path / "out").exists()
    res = _fit(bundle_dir, split, "--out", tmp_path / "out")  # the run's own split: fitted as before
    assert res.exit_code == 0 and (tmp_path / "out" / "config.json").is_file(), res.output


def test_another_split_file_whose_val_rows_were_trained_on_is_refused(run, synthetic_root, tmp_path):
    """Bug: `trust fit run/bundle other.csv` fitted on val rows that were training rows, silently."""
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split
    from hematoscope.trust.training_split import TrainingSplitError, check_fit_split, trained_on_val_rows

    bundle_dir, split = run
    other = save_split(make_split(read_dataset(synthetic_root), val=0.25, test=0.0, seed=3), tmp_path / "other.csv")
    table = read_dataset(other)
    trained = trained_on_val_rows(table, split)
    assert trained and all(table["split"][i] == "val" for i in trained)
    res = _fit(bundle_dir, other, "--out", tmp_path / "out")
    assert res.exit_code == 2 and f"{len(trained)}ofthe24valimagesof" in _flat(res.output), res.output
    # a copy of the same split elsewhere (other paths, same files) is caught by content hash too
    from hematoscope.bundle.base import load_bundle

    bundle = load_bundle(bundle_dir)
    with pytest.raises(TrainingSplitError, match="were training images"):
        check_fit_split(bundle, bundle_dir, other, table, allow_other=True)  # no escape for rows found trained on
    # the run's own split file: fine as it is; a split with val rows the run never trained on: checked, fine
    assert check_fit_split(bundle, bundle_dir, split, read_dataset(split)).status == "same"
    own = read_dataset(split)
    assert check_fit_split(bundle, bundle_dir, tmp_path / "x.csv", own).status == "checked"


def test_a_bundle_away_from_its_run_is_refused_unless_allowed(run, synthetic_root, tmp_path):
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split
    from hematoscope.trust.training_split import TrainingSplitError, check_fit_split

    bundle_dir, split = run
    moved = shutil.copytree(bundle_dir, tmp_path / "elsewhere" / "model")
    res = _fit(moved, synthetic_root, "--out", tmp_path / "out")
    said = _flat(res.output)
    assert res.exit_code == 2 and "run/split.csv" in said and "--allow-other-split" in said, res.output
    bundle, table = load_bundle(moved), make_split(read_dataset(synthetic_root), seed=0)
    with pytest.raises(TrainingSplitError, match="no split.csv of its run beside the bundle"):
        check_fit_split(bundle, moved, synthetic_root, table, split_made_here=True)
    allowed = check_fit_split(bundle, moved, synthetic_root, table, split_made_here=True, allow_other=True)
    assert allowed.status == "unchecked" and "--allow-other-split" in allowed.message
    # val images of another dataset than the bundle was trained on need no flag
    lab = table.assign(dataset="mylab")
    assert check_fit_split(bundle, moved, synthetic_root, lab, split_made_here=True).status == "other_data"


def test_bundles_without_a_training_split_keep_todays_behaviour(tiny_neural_bundle, synthetic_root):
    """Few-shot, classical and hand-made bundles record no split: any split is fitted on. The
    shipped model records its run's split and its documented split file (with test rows), and
    that file is accepted as it is."""
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split
    from hematoscope.trust.training_split import check_fit_split, recorded_split_hashes

    bundle = load_bundle(tiny_neural_bundle)
    table = make_split(read_dataset(synthetic_root), seed=0)
    assert check_fit_split(bundle, tiny_neural_bundle, synthetic_root, table, split_made_here=True).status == "unrecorded"
    default = load_bundle("default")
    hashes = recorded_split_hashes(default)
    assert default.config.training.split_file_sha256_full in hashes and len(hashes) == 2


def test_trust_eval_refuses_a_runs_split_and_records_the_rows_it_scored(run, tmp_path):
    """Bug: `trust eval BUNDLE run/split.csv` scored every row (train and val) as
    in-distribution test data, and trust_eval.json did not say which rows."""
    from hematoscope.trust.ood_sets import make_ood_set

    bundle_dir, split = run
    make_ood_set("noise", tmp_path / "ood", n=6, size=64)
    args = ["trust", "eval", str(bundle_dir), str(split), "--ood", str(tmp_path / "ood"), "--out", str(tmp_path / "e")]
    refused = CliRunner().invoke(app, args)
    said = " ".join(refused.output.replace("│", " ").split())
    assert refused.exit_code == 2 and "has no test rows (its parts: train, val); name the rows to score: --split val, " \
                                      "or --split all" in said, refused.output
    assert not (tmp_path / "e" / "trust_eval.json").exists()
    for part, n in (("val", 8), ("all", 96)):
        res = CliRunner().invoke(app, [*args, "--split", part])
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / "e" / "trust_eval.json").read_text())
        assert report["rows"] == part and report["n_in"] == n and report["data"] == "split.csv"
    wrong = CliRunner().invoke(app, [*args, "--split", "test"])
    assert wrong.exit_code == 2 and "no rows with split 'test'" in " ".join(wrong.output.replace("│", " ").split())
