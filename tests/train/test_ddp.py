"""Multi-process training (Lightning DDP, gloo on CPU): two processes on tiny synthetic data give
one valid bundle scored on the whole validation set, and a killed run resumes from its last
checkpoint. The runs go through the ``hematoscope`` command in a subprocess, as a user starts
them (Lightning's DDP launcher starts the second process by running the same command again)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hematoscope import load_bundle
from hematoscope.train.data import ShareSampler

HEMATOSCOPE = str(Path(sys.executable).parent / "hematoscope")
#: 32 px, random init, global batch 16 (8 per process): a few seconds per epoch on 2 cores.
TINY = dict(size=32, crop_pct=32 / 36, weights=None, batch_size=16, val_fraction=0.25, lr=3e-3, backbone_lr=3e-3,
            accelerator="cpu", devices="2", strategy="ddp")


def _command(data: Path, out: Path, tmp_path: Path, **kw) -> list[str]:
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**TINY, **kw}))
    return [HEMATOSCOPE, "train", str(data), "--out", str(out), "--config", str(config)]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(300)  # ~30 s on an idle 2-core machine; generous for a busy one
def test_two_process_run_gives_one_bundle_scored_on_the_whole_validation_set(synthetic_root, tmp_path):
    from sklearn.metrics import f1_score

    from hematoscope.data.splits import load_split
    from hematoscope.evaluate import evaluate_bundle

    run = tmp_path / "run"
    proc = subprocess.run(_command(synthetic_root, run, tmp_path, epochs=2), capture_output=True, text=True,
                          timeout=280, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("bundle:") == 1  # rank 0 alone reports (and writes)

    bundle = load_bundle(run / "bundle")
    assert bundle.config.training.world_size == 2
    assert bundle.config.training.config["devices"] == "2"
    assert bundle.config.ood is not None and bundle.config.temperature != 1.0  # trust fitted by rank 0
    assert len(list((run / "logs" / "csv").glob("version_*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    # The bundle's metrics are those of the whole validation split, recomputed here through the
    # public path, image for image.
    split = load_split(run / "split.csv")
    val = split[split["split"] == "val"].reset_index(drop=True)
    metrics = json.loads((run / "metrics.json").read_text())
    report = evaluate_bundle(bundle, val)
    assert metrics["n"] == len(val) == 24
    assert report["confusion_matrix"] == metrics["confusion_matrix"]
    assert report["macro_f1"] == pytest.approx(metrics["macro_f1"], abs=1e-9)

    # The score the checkpoint callback monitored during training was gathered from both
    # processes: it equals the best checkpoint's macro-F1 on the whole validation set.
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    monitored = [s["best_model_score"] for k, s in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    pred = bundle.predict(list(val["path"]))
    y_true = [bundle.labels.index(c) for c in val["canonical"]]
    y_pred = pred.probs.argmax(1)
    assert float(monitored[0]) == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-6)


@pytest.mark.timeout(400)  # ~40 s on an idle 2-core machine
def test_a_killed_two_process_run_resumes_from_its_last_checkpoint(synthetic_root, tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_command(synthetic_root, run, tmp_path, epochs=2, fit_trust=False),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.is_file(), "no checkpoint was written"
        os.killpg(proc.pid, signal.SIGKILL)  # both processes, as a crash or a scheduler would
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (run / "bundle").exists(), "the run finished before it could be killed"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0

    resumed = subprocess.run([HEMATOSCOPE, "train", "--resume", str(run)], capture_output=True, text=True,
                             timeout=280, env=_env())
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # it went on from the checkpoint: the epochs done before the kill were not trained again
    assert "epoch 2/2" in resumed.stderr and "epoch 1/2" not in resumed.stderr
    bundle = load_bundle(run / "bundle")
    assert bundle.config.training.epochs_completed == 2
    assert bundle.config.training.world_size == 2


def test_share_sampler_gives_every_process_the_same_number_of_steps_and_a_seeded_order():
    shares = [ShareSampler(n, 36, seed=0, rank=r) for r, n in enumerate((37, 35))]
    for s in shares:
        s.set_epoch(1)
    raw = [list(s) for s in shares]
    orders = [[i - s.n for i in r] for s, r in zip(shares, raw)]  # indices carry the epoch: epoch * n + i
    assert [len(o) for o in orders] == [36, 36] == [len(s) for s in shares]
    assert min(min(o) for o in orders) >= 0 and max(orders[0]) < 37 and max(orders[1]) < 35
    assert len(set(orders[1])) == 35  # a short share repeats images only after using each once
    assert list(shares[0]) == raw[0]  # same epoch, same order
    shares[0].set_epoch(2)
    assert [i - 2 * 37 for i in shares[0]] != orders[0]
    weighted = ShareSampler(4, 400, seed=0, rank=0, weights=np.array([1.0, 1.0, 0.0, 2.0]))
    counts = np.bincount(list(weighted), minlength=4)
    assert counts[2] == 0 and counts[3] > counts[0]


@pytest.mark.timeout(300)  # ~15 s on an idle 2-core machine
def test_two_process_ssl_saves_one_backbone(tmp_path):
    from hematoscope.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "cells", n_per_class=4, size=32, seed=1)
    out = tmp_path / "w.safetensors"
    proc = subprocess.run([HEMATOSCOPE, "ssl", str(data), "--arch", "mobilenetv3_small_050", "--size", "32",
                           "--batch-size", "8", "--max-steps", "3", "--minutes", "2", "--workers", "0",
                           "--devices", "2", "--strategy", "ddp", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("3 steps") == 1  # rank 0 alone reports and writes
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["world_size"] == "2" and f.metadata()["batch_size"] == "8"
