"""Training on tiny synthetic data: a bundle comes out, resume continues exactly, transforms."""
from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from hematoscope import load_bundle
from hematoscope.data.images import load_image
from hematoscope.train import TrainConfig, resume, train
from hematoscope.train.data import TrainDataError
from hematoscope.train.run import RunDirError


def tiny_config(data, out, **kw) -> TrainConfig:
    """32 px, random init, batch 16: a few seconds per epoch on 2 cores."""
    opts = dict(data=str(data), out=str(out), size=32, crop_pct=32 / 36, weights=None, epochs=2, batch_size=16,
                val_fraction=0.25, lr=3e-3, backbone_lr=3e-3)
    return TrainConfig(**{**opts, **kw})


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    return train(tiny_config(synthetic_root, tmp_path_factory.mktemp("run") / "run"))


def test_training_produces_a_loadable_bundle_and_run_files(finished_run, synthetic_root):
    run = finished_run.run_dir
    for name in ("train_config.json", "split.csv", "metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "bundle/model.safetensors", "bundle/config.json", "bundle/README.md"):
        assert (run / name).is_file(), name
    assert list((run / "logs" / "csv").glob("version_*/metrics.csv"))
    assert list((run / "logs" / "tensorboard").glob("version_*/events.out.tfevents*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix",
                            "ece_before", "ece_after", "split"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n"] == 24  # 3 val images x 8 classes
    bundle = load_bundle(finished_run.bundle_path)
    assert bundle.labels == sorted(bundle.labels) and "immature_granulocyte" in bundle.labels
    assert bundle.preprocess.size == 32 and bundle.preprocess.resize == "shorter_crop"
    assert bundle.config.ood is not None and bundle.config.temperature != 1.0  # trust was fitted
    assert bundle.config.training.epochs_completed == 2
    assert bundle.config.training.split_file_sha256
    config_text = (run / "bundle" / "config.json").read_text()  # data and run by name, not by this machine's paths
    assert str(synthetic_root) not in config_text and str(run.parent) not in config_text
    assert finished_run.epochs_completed == 2 and finished_run.images_per_second > 0


def test_bundle_reproduces_validation_metrics(finished_run):
    """The saved bundle, used through the public predict path, scores the val split as training said."""
    from hematoscope.data.splits import load_split
    from hematoscope.evaluate import evaluate_bundle

    split = load_split(finished_run.run_dir / "split.csv")
    val = split[split["split"] == "val"]
    report = evaluate_bundle(load_bundle(finished_run.bundle_path), val.reset_index(drop=True))
    assert report["confusion_matrix"] == finished_run.metrics["confusion_matrix"]


def test_eval_transform_is_the_bundle_preprocess_and_train_transform_is_random(synthetic_root, tmp_path):
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.samples import class_column
    from hematoscope.data.splits import make_split
    from hematoscope.train.data import CellDataModule, TrainImages, eval_preprocess

    config = tiny_config(synthetic_root, tmp_path / "r", limit_per_class=3)
    table = make_split(read_dataset(synthetic_root), val=0.34, test=0.0, seed=0)
    table = table.assign(cls=class_column(table)).groupby("cls").head(3).reset_index(drop=True)
    labels = sorted(set(table["cls"]))
    data = CellDataModule(table, labels, config, eval_preprocess(config))
    data.setup()
    pre = data.preprocess  # the bundle's: with the training images' colour reference
    assert pre.colour == "percentile" and len(pre.colour_ref) == 6
    for split in ("val", "train"):
        ds = data.eval_dataset(split)
        for i in range(len(ds)):
            x, y = ds[i]
            expected = pre([load_image(ds.paths[i])])[0]
            np.testing.assert_array_equal(x.numpy(), expected)
            np.testing.assert_array_equal(ds[i][0].numpy(), x.numpy())  # deterministic
            assert labels[y] == table.set_index("path").loc[ds.paths[i], "cls"]
    lazy = CellDataModule(table, labels, config.model_copy(update={"max_cache_gb": 0.0}), pre)
    lazy.setup()  # over the memory guard: images are decoded on access, with the same results
    assert lazy.train.images is None and lazy.val.images is None
    for split in ("val", "train"):
        a, b = data.eval_dataset(split), lazy.eval_dataset(split)
        assert a.paths == b.paths
        np.testing.assert_array_equal(a[0][0].numpy(), b[0][0].numpy())
    x, _ = TrainImages(None, lazy.train.paths, lazy.train.targets, config)[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    loader = data.train_dataloader()
    torch.manual_seed(0)
    a = next(iter(loader))[0]
    torch.manual_seed(1)  # the global random state does not matter: (seed, epoch) decides
    assert torch.equal(next(iter(loader))[0], a)
    loader.sampler.set_epoch(1)
    b = next(iter(loader))[0]
    assert a.dtype == torch.uint8 and a.shape[1:] == (3, 32, 32)
    assert not torch.equal(a, b)  # another epoch, other crops and order


class _Crash(Exception):
    pass


class _CrashInSecondEpoch(L.Callback):
    """Fails the run in the middle of the second epoch (after the first epoch's checkpoint)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise _Crash("simulated crash")


def test_resume_after_a_crash_matches_an_unbroken_run(synthetic_root, tmp_path, finished_run):
    config = tiny_config(synthetic_root, tmp_path / "crashed")
    with pytest.raises(_Crash):
        train(config, callbacks=[_CrashInSecondEpoch()])
    assert (tmp_path / "crashed" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "crashed" / "bundle").exists()
    with pytest.raises(RunDirError, match="--resume"):
        train(config)
    resumed = resume(tmp_path / "crashed")
    assert resumed.epochs_completed == 2
    unbroken = load_bundle(finished_run.bundle_path).net.model.state_dict()
    again = load_bundle(resumed.bundle_path).net.model.state_dict()
    for k, v in unbroken.items():
        torch.testing.assert_close(again[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_split_made_for_training_keeps_each_cells_crops_on_one_side(synthetic_root, tmp_path):
    """Crops of one cell (a patient id) never straddle train and val: validation stays honest."""
    import pandas as pd

    from hematoscope.train.data import SPLIT_FILE, prepare_split

    files = sorted(synthetic_root.rglob("*.png"))
    pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files],
                  "patient": [f"{p.parent.name}-{i // 3}" for i, p in enumerate(files)]}).to_csv(
        tmp_path / "cells.csv", index=False)
    (tmp_path / "run").mkdir()
    prepare_split(tiny_config(tmp_path / "cells.csv", tmp_path / "run"), tmp_path / "run")
    split = pd.read_csv(tmp_path / "run" / SPLIT_FILE)
    assert set(split["split"]) == {"train", "val"}
    assert (split.groupby("patient")["split"].nunique() == 1).all()


def test_a_label_typo_and_classes_without_validation_images_are_warned_about(synthetic_root, tmp_path, caplog):
    """A typo ('nuetrophil' on two training rows of a split file) would silently add a class with
    no validation images: training warns, naming it (and the likely meant class), before any
    image is decoded, and still trains (a research dataset may have labels of its own)."""
    import logging

    import pandas as pd

    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split
    from hematoscope.train.data import prepare_split

    split = make_split(read_dataset(synthetic_root), val=0.25, test=0.0, seed=0)
    typo = split.index[(split["canonical"] == "neutrophil") & (split["split"] == "train")][:2]
    split.loc[typo, "label"], split.loc[typo, "canonical"] = "nuetrophil", None
    save_split(split, tmp_path / "typo.csv")
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="hematoscope"):
        table, labels = prepare_split(tiny_config(tmp_path / "typo.csv", tmp_path / "run"), tmp_path / "run")
    assert "nuetrophil" in labels and len(labels) == 9  # not refused
    text = " ".join(caplog.text.split())
    assert "taxonomy does not know" in text and "'nuetrophil' (2 train, 0 val; did you mean 'neutrophil'?)" in text
    assert "without validation images: nuetrophil (2 train)" in text
    assert "fewer than 5 validation images" in text  # 3 val images per class here

    caplog.clear()
    (tmp_path / "clean").mkdir()
    with caplog.at_level(logging.WARNING, logger="hematoscope"):  # a clean split of known labels: no label warning
        prepare_split(tiny_config(synthetic_root, tmp_path / "clean", val_fraction=0.5), tmp_path / "clean")
    assert not caplog.text, caplog.text
    assert len(pd.read_csv(tmp_path / "clean" / "split.csv"))


def test_a_kfold_split_file_trains_the_fold_it_is_told(synthetic_root, tmp_path):
    import pandas as pd

    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import kfold_split, save_split
    from hematoscope.train.data import SPLIT_FILE, prepare_split

    save_split(kfold_split(read_dataset(synthetic_root), k=4, seed=0), tmp_path / "folds.csv")
    folds = pd.read_csv(tmp_path / "folds.csv")
    with pytest.raises(ValueError, match="pick the fold that validates with --fold 0..3"):
        prepare_split(tiny_config(tmp_path / "folds.csv", tmp_path / "a"), tmp_path / "a")
    (tmp_path / "b").mkdir()
    prepare_split(tiny_config(tmp_path / "folds.csv", tmp_path / "b", fold=2), tmp_path / "b")
    split = pd.read_csv(tmp_path / "b" / SPLIT_FILE)
    assert set(split.loc[split["split"] == "val", "path"]) == set(folds.loc[folds["split"] == "fold_2", "path"])
    assert len(split) == len(folds)


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    with pytest.raises(RunDirError, match="not a training run"):
        resume(tmp_path)


def test_yaml_config_with_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: somewhere\nout: runs/x\nepochs: 5\nbatch-size: 8\naugment: randaugment\n")
    cfg = TrainConfig.from_yaml(f, epochs=7, weights=None)
    assert (cfg.epochs, cfg.batch_size, cfg.augment, cfg.weights) == (7, 8, "randaugment", None)
    f.write_text("data: x\nout: y\nepochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.from_yaml(f)
    with pytest.raises(ValueError, match="freeze_epochs"):
        TrainConfig(data="x", out="y", epochs=2, freeze_epochs=2)


@pytest.mark.slow
def test_resume_after_kill_9_of_a_training_process(synthetic_root, tmp_path):
    """A real ``hematoscope train`` process is killed with SIGKILL right after its first
    checkpoint; ``--resume`` finishes the run with the configured number of epochs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from hematoscope.cli.main import run; run()", "train", str(synthetic_root),
           "--out", str(run), "--size", "32", "--weights", "none", "--epochs", "3", "--batch-size", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "bundle").exists()
    done = subprocess.run([*cmd[:3], "train", "--resume", str(run)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_bundle(run / "bundle").config.training.epochs_completed == 3


def test_training_on_real_pbc_images(pbc_subset, tmp_path):
    """Real JPEGs (6 per class) from ImageNet weights: the pipeline runs end to end and the
    bundle answers for every class."""
    result = train(tiny_config(pbc_subset, tmp_path / "run", size=48, crop_pct=48 / 54, weights="imagenet-offline",
                               epochs=1, val_fraction=0.34))
    bundle = load_bundle(result.bundle_path)
    assert bundle.labels == ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte",
                             "monocyte", "neutrophil", "platelet"]
    assert result.metrics["n"] == 16 and not result.skipped
    pred = bundle.predict(sorted(pbc_subset.glob("*/*.jpg"))[:4])
    assert pred.probs.shape == (4, 8)


def test_frozen_bn_keeps_batchnorm_statistics_while_weights_learn(synthetic_root, tmp_path):
    import torch

    from hematoscope.bundle.neural import NeuralBundle

    result = train(tiny_config(synthetic_root, tmp_path / "run", epochs=1, frozen_bn=True, fit_trust=False))
    trained = load_bundle(result.bundle_path).net.model.state_dict()
    torch.manual_seed(0)
    fresh = NeuralBundle.create(load_bundle(result.bundle_path).labels, weights=None).net.model.state_dict()
    stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained[k], fresh[k]) for k in stats)  # still the initial 0 / 1
    convs = [k for k in trained if k.endswith("conv_stem.weight")]
    assert not torch.equal(trained[convs[0]], fresh[convs[0]])


def test_mixstyle_acts_in_training_only_and_leaves_no_hook_behind(synthetic_root, tmp_path):
    import torch

    from hematoscope.bundle.neural import NeuralBundle
    from hematoscope.models.preprocess import Preprocess
    from hematoscope.train.module import CellClassifier

    cfg = tiny_config(synthetic_root, tmp_path / "run", mixstyle=1.0)
    torch.manual_seed(0)
    bundle = NeuralBundle.create(["a", "b"], weights=None)
    module = CellClassifier(bundle.net, cfg, Preprocess(size=32), np.array([4, 4]))
    x = torch.randn(6, 3, 32, 32)
    bundle.net.eval()
    plain = bundle.net(x)[0]
    module.on_fit_start()
    torch.testing.assert_close(bundle.net(x)[0], plain)  # eval mode: untouched
    bundle.net.train()
    for m in bundle.net.modules():  # batch statistics would differ anyway: compare in eval-BN
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(1)
    mixed = bundle.net(x)[0]
    assert not torch.allclose(mixed, plain, atol=1e-5)
    module.on_fit_end()
    torch.testing.assert_close(bundle.net(x)[0], plain)  # hooks removed: the saved model is the plain one


def test_mixstyle_and_random_conv_train_a_loadable_bundle(synthetic_root, tmp_path):
    result = train(tiny_config(synthetic_root, tmp_path / "run", epochs=1, mixstyle=0.5, random_conv=0.5,
                               fit_trust=False))
    bundle = load_bundle(result.bundle_path)
    recorded = bundle.config.training.model_dump()["config"]
    assert recorded["mixstyle"] == 0.5 and recorded["random_conv"] == 0.5
    assert np.isfinite(bundle.predict(sorted(synthetic_root.rglob("*.png"))[:3]).probs).all()


def test_group_norm_trains_a_bundle_that_reloads_and_exports_as_group_norm(synthetic_root, tmp_path):
    from hematoscope.export.onnx import FP32_TOLERANCE, export_onnx

    result = train(tiny_config(synthetic_root, tmp_path / "run", epochs=1, norm="group", fit_trust=False))
    bundle = load_bundle(result.bundle_path)
    assert bundle.config.model.norm == "group"
    norms = {type(m).__name__ for m in bundle.net.modules() if "Norm" in type(m).__name__}
    assert norms == {"GroupNormAct"}
    images = sorted(synthetic_root.rglob("*.png"))[:6]
    report = export_onnx(bundle, tmp_path / "exported")
    assert report.max_prob_diff < FP32_TOLERANCE
    exported = load_bundle(tmp_path / "exported")
    exported.use_backend("onnx")
    np.testing.assert_allclose(exported.predict(images).probs, bundle.predict(images).probs, atol=1e-4)


def test_frozen_bn_with_group_norm_is_refused(tmp_path):
    with pytest.raises(ValueError, match="frozen_bn"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), norm="group", frozen_bn=True)


def _epoch_losses(run_dir) -> list[float]:
    """Per-epoch training losses from the run's CSV logs (all versions: a resume appends one)."""
    import pandas as pd

    frames = [pd.read_csv(f) for f in sorted((run_dir / "logs" / "csv").glob("version_*/metrics.csv"))]
    rows = pd.concat(frames).dropna(subset=["train_loss"])
    return list(rows.groupby("epoch")["train_loss"].last())


def test_a_resumed_run_draws_the_same_batches_as_an_unbroken_one(synthetic_root, tmp_path):
    """The same order, crops and colour draws after a resume (in a process whose random state
    differs from the unbroken run's): identical per-epoch losses, not merely close weights."""
    cfg = dict(epochs=3, color_jitter=0.2, hue_jitter=0.05, blur_prob=0.3, scale_jitter=0.2, fit_trust=False)
    unbroken = train(tiny_config(synthetic_root, tmp_path / "unbroken", **cfg))

    class CrashInThirdEpoch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 1:
                raise _Crash("simulated crash")

    with pytest.raises(_Crash):
        train(tiny_config(synthetic_root, tmp_path / "crashed", **cfg), callbacks=[CrashInThirdEpoch()])
    torch.manual_seed(12345)  # the resumed process starts from another random state
    torch.rand(1000)
    resumed = resume(tmp_path / "crashed")
    a, b = _epoch_losses(unbroken.run_dir), _epoch_losses(resumed.run_dir)
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_ema_ships_the_average_and_a_resumed_run_keeps_it(synthetic_root, tmp_path):
    """With ``ema`` the bundle holds the moving average (not the last raw weights), and a run
    killed mid-way resumes with its average, ending where an unbroken run ends."""
    cfg = dict(epochs=2, ema=0.9, fit_trust=False, weights_dtype="float32")  # compared with the checkpoint exactly
    unbroken = train(tiny_config(synthetic_root, tmp_path / "unbroken", **cfg))
    last = torch.load(unbroken.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    shipped = load_bundle(unbroken.bundle_path).net.model.state_dict()
    key = next(k for k in shipped if k.endswith("conv_stem.weight"))
    raw, average = last["current_model_state"][f"net.model.{key}"], last["state_dict"][f"net.model.{key}"]
    assert not torch.equal(raw, average)
    best = torch.load(unbroken.best_checkpoint, map_location="cpu", weights_only=True)
    torch.testing.assert_close(shipped[key], best["state_dict"][f"net.model.{key}"])

    with pytest.raises(_Crash):
        train(tiny_config(synthetic_root, tmp_path / "crashed", **cfg), callbacks=[_CrashInSecondEpoch()])
    resumed = load_bundle(resume(tmp_path / "crashed").bundle_path).net.model.state_dict()
    for k, v in shipped.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_consistency_sees_two_colour_views_and_logs_their_distance(synthetic_root, tmp_path):
    from hematoscope.bundle.neural import NeuralBundle
    from hematoscope.models.preprocess import Preprocess
    from hematoscope.train.module import CellClassifier

    cfg = tiny_config(synthetic_root, tmp_path / "run", consistency=1.0, hue_jitter=0.1, gamma_jitter=0.3)
    module = CellClassifier(NeuralBundle.create(["a", "b"], weights=None).net, cfg, Preprocess(size=32),
                            np.array([4, 4]))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    first, again, second = module.augment(x), module.augment(x), module.augment(x, view=1)
    torch.testing.assert_close(first, again)  # each view repeats its draws (resume)
    assert not torch.allclose(first, second, atol=1e-3)  # the second view has draws of its own

    result = train(tiny_config(synthetic_root, tmp_path / "run", epochs=1, consistency=1.0, fit_trust=False))
    logged = (result.run_dir / "logs" / "csv").glob("version_*/metrics.csv")
    header = next(logged).read_text().splitlines()[0].split(",")
    assert "train_view_distance" in header
    bundle = load_bundle(result.bundle_path)
    assert bundle.config.training.model_dump()["config"]["consistency"] == 1.0
    assert np.isfinite(bundle.predict(sorted(synthetic_root.rglob("*.png"))[:3]).probs).all()


def test_mix_blends_pairs_of_crops_and_their_labels(synthetic_root, tmp_path):
    from hematoscope.train.module import mix_batch

    torch.manual_seed(0)
    # crop i is flat with value i and of class i: a mixed crop's mean value is its label's mean class
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    y = torch.arange(4)
    kinds = set()
    for _ in range(12):
        mixed, probs = mix_batch(x, y, 4)
        assert mixed.shape == x.shape and probs.shape == (4, 4)
        torch.testing.assert_close(probs.sum(1), torch.ones(4))
        torch.testing.assert_close(mixed.mean((1, 2, 3)), probs @ torch.arange(4.0), atol=1e-5, rtol=0)
        kinds.add("blend" if len(torch.unique(mixed[0])) == 1 else "patch")  # MixUp blends, CutMix pastes a box
    assert kinds == {"blend", "patch"}
    with pytest.raises(ValueError, match="loss 'ce'"):
        tiny_config(synthetic_root, tmp_path / "bad", mix=0.5, loss="focal")

    result = train(tiny_config(synthetic_root, tmp_path / "run", epochs=1, mix=1.0, fit_trust=False))
    bundle = load_bundle(result.bundle_path)
    assert bundle.config.training.model_dump()["config"]["mix"] == 1.0
    assert np.isfinite(bundle.predict(sorted(synthetic_root.rglob("*.png"))[:3]).probs).all()


def test_subtype_loss_trains_the_backbone_and_leaves_the_bundle_with_its_classes(synthetic_root, tmp_path):
    import pandas as pd

    with pytest.raises(ValueError, match="mix or consistency"):
        tiny_config(synthetic_root, tmp_path / "bad", subtypes=0.5, mix=0.5)
    paths = sorted(synthetic_root.rglob("*.png"))
    labelled = pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths]})
    labelled.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(TrainDataError, match="'subtype' column"):
        train(tiny_config(tmp_path / "labels.csv", tmp_path / "nocol", epochs=1, subtypes=0.5, fit_trust=False))

    # two subtypes per class (by file order), a few rows without one, as PBC's generic "IG" files
    data = tmp_path / "samples.csv"
    labelled.assign(subtype=["" if i % 7 == 0 else f"{p.parent.name}-{i % 2}" for i, p in enumerate(paths)]).to_csv(
        data, index=False)
    plain = train(tiny_config(data, tmp_path / "plain", epochs=1, fit_trust=False))
    aux = train(tiny_config(data, tmp_path / "aux", epochs=1, subtypes=1.0, fit_trust=False))

    from safetensors.torch import load_file

    w_plain, w_aux = (load_file(r.bundle_path / "model.safetensors") for r in (plain, aux))
    assert set(w_plain) == set(w_aux)  # the subtype layer is not kept
    assert load_bundle(aux.bundle_path).labels == load_bundle(plain.bundle_path).labels
    stem = next(k for k in w_plain if k.startswith("conv_stem"))
    assert not torch.equal(w_plain[stem], w_aux[stem])  # the subtype loss reached the backbone
    logged = pd.read_csv(next((aux.run_dir / "logs" / "csv").glob("version_*/metrics.csv")))
    assert np.isfinite(logged["train_subtype_loss"].dropna()).all() and logged["train_subtype_loss"].notna().any()
