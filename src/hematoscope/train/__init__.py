"""Supervised training (PyTorch Lightning): ``train(TrainConfig(...)) -> RunResult``.

    >>> from hematoscope.train import TrainConfig, train          # doctest: +SKIP
    >>> result = train(TrainConfig(data="pbc/", out="runs/pbc"))
    >>> result.bundle_path, result.metrics["macro_f1"]

Torch and Lightning load only when :func:`train` or :func:`resume` is called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hematoscope.train.config import TrainConfig

if TYPE_CHECKING:
    from hematoscope.train.run import RunResult


def train(config: TrainConfig, **kwargs) -> "RunResult":
    """Run training; see :func:`hematoscope.train.run.train`."""
    _require_train()
    from hematoscope.train.run import train as _train

    return _train(config, **kwargs)


def resume(run_dir, **kwargs) -> "RunResult":
    """Continue a killed or stopped run; see :func:`hematoscope.train.run.resume`."""
    _require_train()
    from hematoscope.train.run import resume as _resume

    return _resume(run_dir, **kwargs)


def _require_train() -> None:
    from hematoscope._extras import require

    require("torch", "torchvision", "lightning", "timm", "skimage", extra="train", purpose="training")


__all__ = ["TrainConfig", "train", "resume"]
