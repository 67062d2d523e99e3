"""A training run killed before its first checkpoint: ``--resume`` starts it over cleanly (same
configuration, same split) instead of refusing both to resume and to restart."""
from __future__ import annotations

import lightning as L
import pytest
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.cli.main import app
from hematoscope.train import TrainConfig, train
from hematoscope.train.run import RunDirError


class _Killed(RuntimeError):
    pass


class _DieInFirstBatch(L.Callback):
    """Stops the run in its very first training step, before any checkpoint is written."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise _Killed("simulated kill before the first checkpoint")


def _config(data, out) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), size=32, crop_pct=32 / 36, weights=None, epochs=1,
                       batch_size=16, val_fraction=0.25, fit_trust=False)


def test_resume_starts_a_run_killed_before_its_first_checkpoint_over(synthetic_root, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        train(_config(synthetic_root, run), callbacks=[_DieInFirstBatch()])
    assert (run / "train_config.json").is_file() and (run / "split.csv").is_file()
    assert not (run / "checkpoints" / "last.ckpt").exists()
    split_before = (run / "split.csv").read_bytes()
    with pytest.raises(RunDirError, match="starts over"):
        train(_config(synthetic_root, run))  # a plain restart still points at --resume

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "split.csv").read_bytes() == split_before  # same split
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "logs" / "csv").glob("version_*"))) == 1  # the dead attempt's logs are gone
    bundle = load_bundle(run / "bundle")
    assert bundle.config.training.epochs_completed == 1


def test_resume_of_a_folder_that_is_no_run_is_still_an_error(tmp_path):
    from hematoscope.train import resume

    with pytest.raises(RunDirError, match="not a training run"):
        resume(tmp_path)
    with pytest.raises(RunDirError, match="to resume from"):
        train(_config(tmp_path / "data", tmp_path / "empty"), resume=True)


def test_resume_refuses_a_split_edited_since_the_run_started(synthetic_root, tmp_path):
    """Moving rows between train and val of a stopped run's split.csv, then resuming, trained on
    some images it had validated on (or the reverse), and trust fit then took the edited file as
    the run's own. The run keeps its split's hash and refuses the edited file."""
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        train(_config(synthetic_root, run), callbacks=[_DieInFirstBatch()])
    split = run / "split.csv"
    original = split.read_text()
    split.write_text(original.replace(",val,", ",train,", 3))
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 2 and "changed since the run started" in " ".join(result.output.split())
    split.write_text(original)  # restored: it resumes
    assert CliRunner().invoke(app, ["train", "--resume", str(run)]).exit_code == 0
