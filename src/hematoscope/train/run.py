"""``train(config)``: one supervised training run, from a dataset to a saved bundle.

Run directory layout::

    train_config.json     the TrainConfig (``--resume`` reads it back)
    split.csv             the train/val split used (with file hashes)
    checkpoints/          best.ckpt (by val macro-F1) and last.ckpt (Lightning, atomic writes)
    logs/                 TensorBoard and CSV logs
    metrics.json          validation metrics of the best checkpoint (+ calibration, trust)
    bundle/               the model bundle of the best checkpoint
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch

from hematoscope import _io
from hematoscope.bundle.base import ModelOutput
from hematoscope.bundle.neural import NeuralBundle
from hematoscope.models.backbones import weights_reference
from hematoscope.train.config import TrainConfig
from hematoscope.train.data import SPLIT_FILE, SPLIT_HASH_FILE, CellDataModule, EvalImages, eval_preprocess, prepare_split
from hematoscope.train.module import AtomicCheckpointIO, CellClassifier

log = logging.getLogger("hematoscope")
CONFIG_FILE = "train_config.json"
LAST = "last.ckpt"
BEST = "best.ckpt"
BUNDLE_DIR = "bundle"
METRICS_FILE = "metrics.json"


class RunDirError(ValueError):
    """The run directory already holds a run (and --resume was not asked), or cannot be resumed."""


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    bundle_path: Path
    metrics: dict
    best_checkpoint: Path
    epochs_completed: int
    train_seconds: float
    images_per_second: float
    skipped: list = field(default_factory=list)
    #: the run had finished before this call (``resume`` of a run whose bundle is written):
    #: nothing was trained or written; metrics and epochs are the saved ones
    already_finished: bool = False


def resume(run_dir: Path | str, callbacks: list | None = None) -> RunResult | None:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved configuration.

    A run that has finished (its bundle and ``metrics.json`` written) is left as it is: nothing
    is trained or re-saved (a trust layer refitted in place since stays), and the result says
    ``already_finished``.

    Raises:
        RunDirError: no saved configuration or checkpoint.
    """
    run_dir = Path(run_dir)
    cfg = run_dir / CONFIG_FILE
    if not cfg.is_file():
        raise RunDirError(f"{run_dir} has no {CONFIG_FILE}: not a training run directory")
    config = TrainConfig.model_validate(json.loads(cfg.read_text(encoding="utf-8")))
    return train(config, resume=True, callbacks=callbacks)


def train(config: TrainConfig, *, resume: bool = False, callbacks: list | None = None) -> RunResult | None:
    """Train a neural bundle as ``config`` says and save it in ``config.out/bundle``.

    Args:
        config: the run's configuration.
        resume: continue from ``checkpoints/last.ckpt`` in ``config.out`` (exactly where it stopped:
            epoch, optimiser, schedule, callbacks; the per-epoch random state is reseeded from
            (seed, epoch)). A run that stopped before its first checkpoint starts over, with its
            saved configuration and split. A finished run (bundle and metrics written) is not
            touched: its saved result comes back with ``already_finished``.
        callbacks: extra Lightning callbacks.

    Several processes (``config.devices`` x ``config.num_nodes``, Lightning DDP: gloo on CPU,
    NCCL on GPUs; started by Lightning, torchrun or SLURM) each cache and train on their share of
    the images with ``batch_size / processes`` per step; validation is scored on the gathered
    whole set; rank 0 alone writes the run directory, checkpoints, logs and bundle.

    Returns:
        The run's result (bundle path, validation metrics, timing); None in the processes other
        than rank 0 of a multi-process run.

    Raises:
        RunDirError: ``config.out`` already holds a run and ``resume`` is False, or nothing to resume.
        TrainDataError, DatasetError: unusable data.
        WeightsError: unknown architecture or weights.

    A fresh run that fails before training starts (unusable data, unknown architecture or
    weights) removes what it wrote, so a corrected retry may use the same ``config.out``.
    """
    run_dir = Path(config.out)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / LAST
    if resume and _finished(run_dir):
        # every process checks (a requeued multi-process job starts them all): no trainer, no rendezvous
        return _saved_result(run_dir)
    # The trainer first: in a multi-process run its rank says what this process may write.
    best_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename=Path(BEST).stem, monitor="val_macro_f1",
                                                  mode="max", save_top_k=1, enable_version_counter=False)
    # last.ckpt after every epoch, on its own: Lightning's save_last writes it only in the epochs
    # whose score improved, so a run stopped after a plateau would resume from far back
    last_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename=Path(LAST).stem, monitor=None,
                                                  save_top_k=1, enable_version_counter=False)
    epoch_log = _EpochLog()
    cbs = [best_cb, last_cb, epoch_log, *(callbacks or [])]
    if config.ema:
        cbs.append(L.pytorch.callbacks.EMAWeightAveraging(decay=config.ema))
    if config.early_stop:
        cbs.append(L.pytorch.callbacks.EarlyStopping(monitor="val_macro_f1", mode="max", patience=config.early_stop))
    tty = sys.stderr.isatty()
    if tty:
        cbs.append(L.pytorch.callbacks.RichProgressBar())
    loggers = [L.pytorch.loggers.TensorBoardLogger(run_dir / "logs", name="tensorboard"),
               L.pytorch.loggers.CSVLogger(run_dir / "logs", name="csv")]
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=config.devices,
        num_nodes=config.num_nodes, strategy=config.strategy, use_distributed_sampler=False,  # data.py shares
        precision=config.precision, callbacks=cbs, logger=loggers, plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir, num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=tty,
    )
    world = trainer.world_size
    if config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} (the global batch) must be a multiple of the "
                         f"{world} training processes")
    restart = created = False
    if trainer.is_global_zero:
        # A run killed before its first checkpoint has its configuration (and split) but nothing to
        # continue from: resuming it starts it over, with the same configuration and split.
        restart = resume and not last.is_file() and (run_dir / CONFIG_FILE).is_file()
        if resume and not last.is_file() and not restart:
            raise RunDirError(f"{run_dir} has no {last.relative_to(run_dir)} to resume from")
        if restart:
            log.warning("%s stopped before its first checkpoint: starting the run over", run_dir)
            _clear_unfinished_attempt(run_dir)
            resume = False
        elif not resume and _finished(run_dir):
            raise RunDirError(f"{run_dir} already holds a finished training run (bundle: {run_dir / BUNDLE_DIR}); "
                              "choose another --out to train again")
        elif not resume and (run_dir / CONFIG_FILE).exists():
            raise RunDirError(f"{run_dir} already holds a training run; resume it with --resume {run_dir} "
                              "(a run stopped before its first checkpoint starts over) or choose another --out")
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if trainer.is_global_zero:
            L.seed_everything(config.seed, workers=True, verbose=False)
            table, labels = prepare_split(config, run_dir,
                                          resume=resume or (restart and (run_dir / SPLIT_FILE).is_file()))
            if not resume:
                _io.write_json(run_dir / CONFIG_FILE, config.model_dump(mode="json"))
            if world > 1:
                _announce_launch(run_dir, trainer)
        else:  # another process of a multi-process run: rank 0 has prepared the run directory
            _await_launch(run_dir, trainer)
            resume = last.is_file()
            L.seed_everything(config.seed, workers=True, verbose=False)
            table, labels = prepare_split(config, run_dir, resume=True)
        data = CellDataModule(table, labels, config, eval_preprocess(config), rank=trainer.global_rank,
                              world_size=world)
        data.setup("fit")
        preprocess = data.preprocess  # with the colour reference of the training images
        bundle = NeuralBundle.create(labels, arch=config.arch, preprocess=preprocess,
                                     weights=None if resume else config.weights, name=config.name or run_dir.name,
                                     dtype=config.weights_dtype, drop_rate=config.drop_rate, norm=config.norm)
        bundle.config.model.weights_source = weights_reference(config.weights)
        module = CellClassifier(bundle.net, config, preprocess, data.class_counts(), len(data.subtype_names))
    except Exception:
        # A failed start (bad data, unknown architecture or weights): a fresh run leaves nothing behind
        # that would block the corrected retry or make --resume replay the bad configuration.
        if trainer.is_global_zero and not resume and not restart:
            _remove_failed_start(run_dir, created)
        raise
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) before training: what is saved lets --resume start the run
        # over; only an empty run directory is not left behind.
        if trainer.is_global_zero and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    trainer.log_every_n_steps = max(1, min(50, data.steps_per_epoch()))
    threads = torch.get_num_threads()
    if world > 1 and trainer.num_devices > 1 and isinstance(trainer.accelerator, L.pytorch.accelerators.CPUAccelerator):
        # the processes of one machine share its cores
        torch.set_num_threads(max(1, min(threads, _cpu_count() // trainer.num_devices)))
    with warnings.catch_warnings():
        # Known, harmless Lightning notices: LeafSpec is a torch deprecation inside Lightning; the
        # validation metrics are computed on the gathered whole set, the same in every process,
        # so need no sync.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # resume
        warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
        trainer.fit(module, datamodule=data, ckpt_path=last if resume else None)
    if world > 1:
        if not trainer.is_global_zero:
            return None  # rank 0 alone writes the bundle, metrics and trust
        torch.set_num_threads(threads)
        data = data.whole()  # final metrics and trust on every train / val image

    best = Path(best_cb.best_model_path) if best_cb.best_model_path else last
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    bundle.net.cpu().float().eval()

    val_out, val_y = outputs(bundle, data.eval_dataset("val"), config.batch_size)
    metrics = _final_metrics(bundle, data, val_out, val_y, config)
    fingerprint = hashlib.sha256((run_dir / SPLIT_FILE).read_bytes()).hexdigest()
    completed = trainer.current_epoch
    bundle.config.training = {
        "recipe": "supervised fine-tuning (hematoscope train)",
        # names, not paths: a bundle never records the layout of the machine that trained it
        "config": {**config.model_dump(mode="json"), "data": Path(config.data).name, "out": run_dir.name,
                   "weights": weights_reference(config.weights)},
        "best_checkpoint_epoch": int(torch.load(best, map_location="cpu", weights_only=True)["epoch"]) + 1,
        "epochs_completed": completed,
        "train_images": int(len(data.train.targets)),
        "train_class_counts": dict(zip(bundle.labels, map(int, np.bincount(data.train.targets,
                                                                       minlength=len(bundle.labels))))),
        "val_images": int(len(data.val.targets)),
        "split_file_sha256": fingerprint,
        "train_seconds_this_session": round(epoch_log.seconds, 1),
        "train_images_per_second": round(epoch_log.images_per_second, 1),
        "world_size": world,  # training processes (devices x nodes); batch_size is their global batch
    }
    bundle.config.data_sources = sorted(set(table["dataset"].dropna()))
    bundle.metrics.update({k: v for k, v in metrics.items() if k not in ("calibration", "trust")})
    bundle_path = bundle.save(run_dir / BUNDLE_DIR)
    _io.write_json(run_dir / METRICS_FILE, metrics)  # last: it marks the run finished (_finished)
    return RunResult(run_dir, bundle_path, metrics, best, completed, epoch_log.seconds,
                     epoch_log.images_per_second, data.skipped)


_LAUNCH_FILE = ".launch"


def _launch_token(trainer: L.Trainer) -> str:
    """What every process of one multi-process launch agrees on: the rendezvous address and port
    (Lightning's own launcher hands them to the processes it starts; torchrun and SLURM set them)."""
    env = trainer.strategy.cluster_environment
    return f"{env.main_address}:{env.main_port}"


def _announce_launch(run_dir: Path, trainer: L.Trainer) -> None:
    """Rank 0: the run directory (split, configuration) is ready for the other processes."""
    _io.write_text(run_dir / _LAUNCH_FILE, _launch_token(trainer))


def _await_launch(run_dir: Path, trainer: L.Trainer, timeout: float = 1800.0) -> None:
    """The other ranks: wait until rank 0 has prepared the run directory for this launch
    (processes started by torchrun or SLURM start together with rank 0, not after it)."""
    token, path = _launch_token(trainer), run_dir / _LAUNCH_FILE
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text(encoding="utf-8") == token):
        if time.monotonic() > deadline:
            raise RunDirError(f"rank {trainer.global_rank}: rank 0 did not prepare {run_dir} within {timeout:.0f} s")
        time.sleep(0.2)


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has finished: its bundle saved (atomically, ``config.json``
    last) and then ``metrics.json`` written."""
    return (run_dir / METRICS_FILE).is_file() and (run_dir / BUNDLE_DIR / "config.json").is_file()


def _saved_result(run_dir: Path) -> RunResult:
    """The result of a finished run, read back from its files (nothing is loaded or written)."""
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    training = json.loads((run_dir / BUNDLE_DIR / "config.json").read_text(encoding="utf-8")).get("training") or {}
    best = run_dir / "checkpoints" / BEST
    return RunResult(run_dir, run_dir / BUNDLE_DIR, metrics, best if best.is_file() else run_dir / "checkpoints" / LAST,
                     int(training.get("epochs_completed", 0)), 0.0, 0.0, already_finished=True)


def _remove_failed_start(run_dir: Path, created: bool) -> None:
    """Remove what a fresh run that failed before training wrote (its configuration, split,
    launch marker, checkpoint and log folders), and the run directory itself when this run
    created it and nothing else is in it."""
    import shutil

    for name in (CONFIG_FILE, SPLIT_FILE, SPLIT_HASH_FILE, _LAUNCH_FILE):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "logs"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _clear_unfinished_attempt(run_dir: Path) -> None:
    """Remove what an attempt that never reached its first checkpoint left behind: partial
    checkpoint files and that attempt's logs. ``train_config.json`` and ``split.csv`` stay."""
    import shutil

    for name in ("checkpoints", "logs"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def outputs(bundle: NeuralBundle, dataset: EvalImages, batch_size: int = 64) -> tuple[ModelOutput, np.ndarray]:
    """Run ``bundle`` over preprocessed ``dataset`` items; returns (outputs, targets)."""
    from torch.utils.data import DataLoader

    logits, features = [], []
    for x, _ in DataLoader(dataset, batch_size=batch_size):
        out = bundle.forward_tensor(x.numpy())
        logits.append(out.logits)
        features.append(out.features)
    return ModelOutput(np.concatenate(logits), np.concatenate(features)), dataset.targets


def _final_metrics(bundle: NeuralBundle, data: CellDataModule, val_out: ModelOutput, val_y: np.ndarray,
                   config: TrainConfig) -> dict:
    from hematoscope.evaluate.metrics import classification_metrics
    from hematoscope.trust import softmax

    probs = softmax(val_out.logits)
    metrics = {"split": "val (run split.csv)", **classification_metrics(val_y, probs.argmax(1), probs, bundle.labels)}
    if not config.fit_trust:
        return metrics
    from hematoscope.trust import fit_trust

    train_out, train_y = outputs(bundle, data.eval_dataset("train"), config.batch_size)
    report = fit_trust(bundle, train=(train_out, train_y), val=(val_out, val_y))
    metrics["ece_before"] = report["calibration"]["ece_before"]
    metrics["ece_after"] = report["calibration"]["ece_after"]
    metrics["temperature"] = report["calibration"]["temperature"]
    metrics["calibration"], metrics["trust"] = bundle.metrics.get("calibration"), bundle.metrics.get("trust")
    return metrics


class _EpochLog(L.Callback):
    """Logs one line per epoch (loss, val metrics) and measures training throughput (images/s of
    the training steps, validation excluded)."""

    def __init__(self):
        self.seconds, self.images = 0.0, 0
        self._start = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch[1]) * trainer.world_size  # every process trains a batch this size

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._start:  # validation inside a training epoch: stop the training clock
            self.seconds += time.monotonic() - self._start
            self._start = 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        log.info("epoch %d/%d: train_loss %.4f  val_loss %.4f  val_acc %.4f  val_macro_f1 %.4f  (%.0f img/s)",
                 trainer.current_epoch + 1, trainer.max_epochs, m.get("train_loss", float("nan")),
                 m.get("val_loss", float("nan")), m.get("val_acc", float("nan")), m.get("val_macro_f1", float("nan")),
                 self.images_per_second)
