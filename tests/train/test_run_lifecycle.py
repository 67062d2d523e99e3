"""How a training run starts, stops and ends as a scheduler sees it: a SIGTERM stops it with a
non-zero status and the resume hint, a failed start leaves nothing that blocks the retry, and
resuming a finished run changes nothing."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.cli.main import app
from hematoscope.train import TrainConfig, resume, train

#: 32 px, random init, batch 16: a few seconds per epoch on 2 cores.
FAST = ["--size", "32", "--weights", "none", "--batch-size", "16"]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(f.relative_to(run)): (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(run.rglob("*"))
            if f.is_file()}


def test_sigterm_stops_a_run_with_143_and_the_resume_hint(synthetic_root, tmp_path):
    """``kill -TERM`` (a scheduler's cancel or pre-emption) mid-training: exit status 143, not 0,
    the hint to resume, no bundle; ``--resume`` then finishes the run."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from hematoscope.cli.main import app; app()", "train", str(synthetic_root),
           "--out", str(run), *FAST, "--epochs", "30", "--limit-per-class", "3"]
    log = tmp_path / "train.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})
        try:
            deadline = time.monotonic() + 120
            while b"epoch 1/30" not in log.read_bytes():  # inside trainer.fit, a checkpoint written
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = _flat(log.read_text())
    assert rc == 143, text
    assert f"hematoscope train --resume {run}" in text, text
    assert not (run / "bundle").exists() and not (run / "metrics.json").exists()
    done = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] + 1
    assert done == len(re.findall(r"epoch \d+/30:", text))  # every epoch trained before the stop is kept

    # --resume goes on from there (one more epoch in the saved configuration keeps this fast)
    cfg = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**cfg, "epochs": done + 1}))
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert load_bundle(run / "bundle").config.training.epochs_completed == done + 1


def test_sigterm_outside_the_training_loop_also_stops_with_143(synthetic_root, tmp_path, monkeypatch):
    """SIGTERM while images decode or trust fits (Lightning's handler not in place) is the same stop."""
    import hematoscope.train

    def terminated(config):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not stop the run")

    class Unhandled(Exception):
        pass

    def unhandled(signum, frame):  # (without it, a command that does not handle SIGTERM would end pytest)
        raise Unhandled

    monkeypatch.setattr(hematoscope.train, "train", terminated)
    original = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = CliRunner().invoke(app, ["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--epochs", "1"])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the command's own handler is gone again
    finally:
        signal.signal(signal.SIGTERM, original)
    assert result.exit_code == 143 and f"hematoscope train --resume {tmp_path / 'r'}" in _flat(result.output)


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_retry(synthetic_root, tmp_path):
    run = tmp_path / "bw"
    base = ["train", str(synthetic_root), "--out", str(run), "--size", "32", "--batch-size", "16", "--epochs", "1",
            "--limit-per-class", "4"]
    for bad, why in ((["--weights", str(tmp_path / "nonexist.safetensors")], "not found"),
                     (["--weights", "none", "--arch", "resnet9999"], "unknown architecture 'resnet9999'")):
        result = CliRunner().invoke(app, [*base, *bad])
        assert result.exit_code == 2 and why in _flat(result.output), result.output
        assert not run.exists(), sorted(p.name for p in run.iterdir())
    # a run folder that was there before (empty, or with a file of the user's) stays, without the failed run's files
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, [*base, "--weights", str(tmp_path / "nonexist.safetensors")])
    assert result.exit_code == 2 and "not found" in _flat(result.output), result.output
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resuming_a_finished_run_changes_nothing(synthetic_root, tmp_path):
    """A requeued job (docs/scale.md's SLURM recipe) or a repeated ``--resume`` after the run
    finished: it says so and leaves every file, e.g. a trust layer refitted in place, as it is."""
    run = tmp_path / "b"
    train(TrainConfig(data=str(synthetic_root), out=str(run), size=32, crop_pct=32 / 36, weights=None, epochs=1,
                      batch_size=16, limit_per_class=4, val_fraction=0.25, fit_trust=False))
    cfg = run / "bundle" / "config.json"
    text = cfg.read_text()
    assert '"name": "b"' in text
    cfg.write_text(text.replace('"name": "b"', '"name": "refitted-in-place"'))  # a later edit in place
    before = _snapshot(run)

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "finished already" in _flat(result.output) and str(run / "bundle") in _flat(result.output)
    again = resume(run)
    assert again.already_finished and again.epochs_completed == 1 and again.bundle_path == run / "bundle"
    assert _snapshot(run) == before


def test_last_checkpoint_is_written_every_epoch_also_without_a_better_score(synthetic_root, tmp_path):
    """A run stopped after epochs without a better validation score resumes from its last epoch,
    not from its best one (Lightning's save_last writes only with a new best)."""
    import torch

    # a learning rate of ~0 and frozen BatchNorm statistics: the same score every epoch, no new best
    result = train(TrainConfig(data=str(synthetic_root), out=str(tmp_path / "run"), size=32, crop_pct=32 / 36,
                               weights=None, epochs=3, batch_size=16, limit_per_class=4, val_fraction=0.25,
                               lr=1e-12, backbone_lr=1e-12, frozen_bn=True, fit_trust=False))
    ckpts = result.run_dir / "checkpoints"
    assert torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2
    assert result.best_checkpoint == ckpts / "best.ckpt"
