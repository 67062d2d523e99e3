"""``hematoscope train`` options driven through the CLI itself (Typer's CliRunner) on a tiny
synthetic dataset, so each option's real code path runs, not a hand-built table."""
from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.cli.main import app

#: 32 px, random init, one epoch: a few seconds on 2 cores.
FAST = ["--size", "32", "--weights", "none", "--epochs", "1", "--batch-size", "16"]


def test_limit_per_class(synthetic_root, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(synthetic_root), "--out", str(run), *FAST,
                                      "--limit-per-class", "5"])
    assert result.exit_code == 0, result.output
    split = pd.read_csv(run / "split.csv")
    per_class = split.groupby("label").size()
    assert len(per_class) == 8 and (per_class == 5).all(), per_class.to_dict()
    assert json.loads((run / "train_config.json").read_text())["limit_per_class"] == 5
    training = load_bundle(run / "bundle").config.training
    assert training.train_images + training.val_images == 40
    # the class mix the model learnt, from which adapt --tune estimates a lab's
    assert sum(training.train_class_counts.values()) == training.train_images
    assert set(training.train_class_counts) == set(load_bundle(run / "bundle").labels)
    assert (split[split["split"] == "train"].groupby("canonical").size().to_dict()
            == {k: v for k, v in training.train_class_counts.items() if v})


def test_options_reach_the_run(synthetic_root, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", str(synthetic_root), "--out", str(run), *FAST, "--limit-per-class", "6", "--sampler", "none",
        "--loss", "focal", "--no-class-weights", "--label-smoothing", "0.05", "--schedule", "constant",
        "--augment", "randaugment", "--seed", "3", "--lr", "0.002", "--backbone-lr", "0.001", "--name", "cli-opts"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "train_config.json").read_text())
    expected = {"size": 32, "weights": None, "epochs": 1, "batch_size": 16, "limit_per_class": 6, "sampler": "none",
                "loss": "focal", "class_weights": False, "label_smoothing": 0.05, "schedule": "constant",
                "augment": "randaugment", "seed": 3, "lr": 0.002, "backbone_lr": 0.001, "name": "cli-opts"}
    assert {k: saved[k] for k in expected} == expected
    bundle = load_bundle(run / "bundle")
    assert bundle.name == "cli-opts" and bundle.preprocess.size == 32
    assert len(pd.read_csv(run / "split.csv")) == 48


def test_limit_per_class_on_a_split_file_keeps_its_train_val_proportions(synthetic_root, tmp_path):
    """`data split` draws with the seed's stream: a limit drawn the same way took each class's test
    and val rows first and left training almost empty. It draws from the train + val rows alone
    and keeps their proportion per class."""
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split
    from hematoscope.train import TrainConfig
    from hematoscope.train.data import prepare_split

    save_split(make_split(read_dataset(synthetic_root), val=0.2, test=0.2, seed=0, group_by=None), tmp_path / "s.csv")
    config = TrainConfig(data=str(tmp_path / "s.csv"), out=str(tmp_path / "run"), limit_per_class=6, seed=0)
    (tmp_path / "run").mkdir()
    table, labels = prepare_split(config, tmp_path / "run")
    counts = table.groupby(["cls", "split"]).size().unstack(fill_value=0)
    assert len(labels) == 8 and (counts.sum(axis=1) == 6).all()
    assert (counts["train"] >= 4).all() and (counts["val"] >= 1).all()  # 12 per class: 7 train, 2-3 val
