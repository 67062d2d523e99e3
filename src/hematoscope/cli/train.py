"""``hematoscope train``: fine-tune a CNN on a labelled dataset and save a model bundle."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import Terminated, console, user_errors


def train_cmd(
    data: Annotated[Optional[Path], typer.Argument(help="Dataset folder (any reader) or split CSV. "
                                                        "Not needed with --resume.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to create.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of options "
                                                                          "(command-line options win).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="RUN_DIR",
                                                   help="Continue a stopped or killed run from its last checkpoint.")] = None,
    reader: Annotated[Optional[str], typer.Option(help="Dataset reader (default: auto-detect).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="timm architecture (default: efficientnet_lite0).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Backbone weights: hematoscope-simclr-pbc (Lite0 "
                                                        "self-supervised on blood cells), imagenet-offline, a "
                                                        ".safetensors/.pth file, a URL, hf-hub:..., or 'none' "
                                                        "(default: hematoscope-simclr-pbc).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Model input side in pixels (default: 128).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: 24).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size (default: 64).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Head learning rate (default: 1e-3).")] = None,
    backbone_lr: Annotated[Optional[float], typer.Option("--backbone-lr", help="Backbone learning rate (default: 3e-4).")] = None,
    freeze_epochs: Annotated[Optional[int], typer.Option("--freeze-epochs", help="Train only the head for the first N epochs.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="weighted | none (class-balanced sampling).")] = None,
    loss: Annotated[Optional[str], typer.Option(help="ce | focal.")] = None,
    class_weights: Annotated[Optional[bool], typer.Option("--class-weights/--no-class-weights",
                                                          help="Weight the loss by inverse class frequency.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option("--label-smoothing", help="(default: 0.1)")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine | onecycle | constant.")] = None,
    ema: Annotated[Optional[float], typer.Option(help="Decay of an exponential moving average of the weights "
                                                 "(e.g. 0.999), used for validation and the bundle (default: 0, off).")] = None,
    augment: Annotated[Optional[str], typer.Option(help="basic | randaugment | augmix.")] = None,
    early_stop: Annotated[Optional[int], typer.Option("--early-stop", metavar="PATIENCE",
                                                      help="Stop after PATIENCE epochs without val macro-F1 gain.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: 0).")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Lightning devices per node (auto, 1, 0,1 ...); on CPU "
                                                      "N > 1 trains in N processes (DDP, gloo).")] = None,
    num_nodes: Annotated[Optional[int], typer.Option("--num-nodes", min=1, help="Machines of a multi-node run "
                                                     "(see docs/scale.md).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Lightning strategy: auto or ddp (--batch-size is then "
                                                    "the global batch).")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="Lightning accelerator (auto, cpu, gpu, mps).")] = None,
    limit_per_class: Annotated[Optional[int], typer.Option("--limit-per-class", help="At most N images per class.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data loader worker processes (default: 0).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default: the run directory's name).")] = None,
    fold: Annotated[Optional[int], typer.Option(min=0, help="Of a k-fold split file: the fold that validates (the "
                                                "others train).")] = None,
) -> None:
    """Fine-tune a CNN (PyTorch Lightning) and save the best checkpoint as a model bundle in RUN_DIR/bundle."""
    import logging

    from hematoscope.train.config import TrainConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    with user_errors():
        options = {k: v for k, v in dict(
            data=None if data is None else str(data), out=None if out is None else str(out), reader=reader, arch=arch,
            size=size, epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr=backbone_lr,
            freeze_epochs=freeze_epochs, sampler=sampler, loss=loss, class_weights=class_weights,
            label_smoothing=label_smoothing, schedule=schedule, ema=ema, augment=augment, early_stop=early_stop,
            seed=seed, devices=devices, num_nodes=num_nodes, strategy=strategy, accelerator=accelerator,
            limit_per_class=limit_per_class, workers=workers, name=name, fold=fold,
        ).items() if v is not None}
        if resume is not None:
            given = [*options, *(["config"] if config else []), *(["weights"] if weights is not None else [])]
            if given:  # silently trained as saved before: a changed --epochs or --lr must not look applied
                raise ValueError(f"--resume goes on with the run's saved options ({resume / 'train_config.json'}); "
                                 f"not used with it: {', '.join(sorted(given))}. Start a new run (--out) to change them")
            from hematoscope.train import resume as resume_run

            result = _interruptible(lambda: resume_run(resume), resume)
        else:
            if data is None or out is None:
                raise ValueError("give DATA and --out RUN_DIR (or --resume RUN_DIR)")
            if weights is not None:
                options["weights"] = None if weights.lower() == "none" else weights
            cfg = TrainConfig.from_yaml(config, **options) if config else TrainConfig.model_validate(options)
            from hematoscope.train import train

            result = _interruptible(lambda: train(cfg), Path(cfg.out))
    if result is None:  # another process of a multi-process run: rank 0 reports
        return
    m = result.metrics
    c = console()
    if result.already_finished:  # a requeued job, a repeated command: nothing to do, nothing changed
        c.print(f"{result.run_dir} has finished already ({result.epochs_completed} epochs); nothing was trained "
                f"or changed. bundle: {result.bundle_path}", highlight=False)
        return
    c.print(f"[bold]done[/]: {result.epochs_completed} epochs, {result.train_seconds / 60:.1f} min training "
            f"({result.images_per_second:.0f} images/s)")
    c.print(f"validation (best checkpoint): accuracy {m['accuracy']:.4f}, balanced accuracy "
            f"{m['balanced_accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
            + (f", ECE {m['ece_before']:.4f} → {m['ece_after']:.4f}" if "ece_after" in m else ""))
    if result.skipped:
        c.print(f"[yellow]{len(result.skipped)} unreadable image(s) skipped[/] (listed in the log)")
    c.print(f"bundle: {result.bundle_path}")


def _interruptible(run, run_dir: Path):
    """``run()``; stopped by Ctrl-C (Lightning exits with code 1 after its graceful shutdown) or by
    SIGTERM (``kill``, a scheduler's cancel, pre-emption or time limit: inside the training loop
    Lightning stops at the next step and raises its SIGTERMException, a SystemExit without a
    code), it says how to go on and exits with 130 or 143 (128 + the signal, as a shell reports a
    process the signal ended), never 0: a scheduler must not count a stopped run as done."""
    import signal
    import threading

    from hematoscope.cli._common import err_console

    def on_sigterm(signum, frame):
        # During trainer.fit Lightning's own handler runs first and calls this one after it: the
        # handler in place is then Lightning's, which stops the run cleanly at the next step.
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            raise Terminated

    installed = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if installed else None
    try:
        return run()
    except (KeyboardInterrupt, SystemExit) as exc:
        terminated = isinstance(exc, Terminated) or _is_lightning_sigterm(exc)
        if isinstance(exc, SystemExit) and exc.code in (0, None) and not terminated:
            raise
        err_console().print(f"training stopped{' (SIGTERM)' if terminated else ''}; go on from the last checkpoint "
                            f"with: hematoscope train --resume {run_dir}", highlight=False)
        raise typer.Exit(128 + int(signal.SIGTERM) if terminated else 130) from None
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _is_lightning_sigterm(exc: BaseException) -> bool:
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:  # pragma: no cover - training needs lightning
        return False
    return isinstance(exc, SIGTERMException)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
