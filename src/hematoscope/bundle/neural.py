"""The "neural" bundle kind: a timm CNN fine-tuned end to end.

Files: ``model.safetensors`` holds the timm model's own state dict (so it is also a valid
``weights=`` file for :func:`hematoscope.models.backbones.create_backbone`); fp16 on disk when
``config.model["dtype"] == "float16"``, always float32 in memory. An optional ``model.onnx``
(written by ``hematoscope export``) is used for inference when the backend allows it.

Backends (``backend=`` argument, or the ``HEMATOSCOPE_BACKEND`` environment variable):
``"auto"`` (ONNX Runtime when the bundle directory has ``model.onnx``, torch otherwise),
``"torch"`` or ``"onnx"``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from hematoscope.bundle.base import Bundle, BundleConfig, BundleError, ModelOutput, register_bundle_kind
from hematoscope.models.backbones import DEFAULT_ARCH, OFFLINE_WEIGHTS, create_backbone
from hematoscope.models.preprocess import Preprocess

log = logging.getLogger("hematoscope")

WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
BACKEND_ENV = "HEMATOSCOPE_BACKEND"
BACKENDS = ("auto", "torch", "onnx")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ClassifierNet(nn.Module):
    """A timm classifier whose forward returns ``(logits, pooled features)``.

    The features are the globally pooled penultimate activations (1,280-d for Lite0): what the
    classifier layer sees, and what out-of-distribution scorers are fitted on.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features


class TorchRunner:
    """Runs a :class:`ClassifierNet` for inference (eval mode, no autograd, channels_last)."""

    def __init__(self, net: ClassifierNet):
        self.net = net

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.net.eval()
        with torch.inference_mode():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            logits, features = self.net(t)
        return logits.float().numpy(), features.float().numpy()


def resolve_backend(backend: str | None) -> str:
    """``backend`` or, when None, ``$HEMATOSCOPE_BACKEND`` or ``"auto"``; validated."""
    value = backend or os.environ.get(BACKEND_ENV) or "auto"
    if value not in BACKENDS:
        raise BundleError(f"backend must be one of {BACKENDS}; got {value!r} "
                          f"(from {'argument' if backend else BACKEND_ENV})")
    return value


@register_bundle_kind("neural")
class NeuralBundle(Bundle):
    """A fine-tuned CNN with its preprocessing, labels and trust settings.

    Args:
        config: the bundle config (``config.model`` = arch, num_features, weights_source, dtype).
        net: the network; built from ``config`` when None (random weights).
        metrics: metrics recorded with the bundle.
        path: where the bundle was loaded from.
        directory: the unpacked bundle directory (where ``model.onnx`` is looked for).
        backend: ``"auto"``, ``"torch"`` or ``"onnx"``; None reads ``$HEMATOSCOPE_BACKEND``.
    """

    def __init__(self, config: BundleConfig, net: ClassifierNet | None = None, metrics: dict | None = None,
                 path: Path | None = None, *, directory: Path | None = None, backend: str | None = None):
        super().__init__(config, metrics, path)
        self.net = net if net is not None else ClassifierNet(
            create_backbone(config.model["arch"], num_classes=len(config.labels), weights=None))
        self.directory = directory
        self.backend = resolve_backend(backend)
        self._runner = None

    @classmethod
    def create(cls, labels: Sequence[str], *, arch: str = DEFAULT_ARCH, preprocess: Preprocess | None = None,
               weights: str | Path | None = OFFLINE_WEIGHTS, name: str = "untrained", dtype: str = "float32",
               drop_rate: float = 0.0, backend: str | None = None) -> "NeuralBundle":
        """A new bundle: backbone ``arch`` with ``weights`` and a fresh classifier for ``labels``.

        Args:
            labels: canonical class names, in output order.
            arch: timm architecture name.
            preprocess: input spec (default: 128 px squash, ImageNet normalisation).
            weights: backbone weights (see :func:`create_backbone`); None = random.
            name: bundle name.
            dtype: on-disk weight dtype, ``"float32"`` or ``"float16"``.
            drop_rate: dropout before the classifier (training only).
            backend: inference backend (see module docstring).

        Raises:
            WeightsError: unknown architecture or unloadable weights.
            ValueError: bad dtype or fewer than two labels.
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        preprocess = preprocess or Preprocess(size=128)
        model = create_backbone(arch, num_classes=len(labels), weights=weights, drop_rate=drop_rate)
        config = BundleConfig(
            kind="neural", name=name, labels=list(labels), preprocess=preprocess.to_dict(),
            model={"arch": arch, "num_features": int(model.num_features),
                   "weights_source": None if weights is None else str(weights), "dtype": dtype},
        )
        from hematoscope.taxonomy import TAXONOMY

        config.taxonomy_version = TAXONOMY.version
        return cls(config, ClassifierNet(model), backend=backend)

    # --- inference ---------------------------------------------------------------------
    def use_backend(self, backend: str | None) -> None:
        """Switch the inference backend (``"auto"``, ``"torch"``, ``"onnx"``; None = environment)."""
        self.backend = resolve_backend(backend)
        self._runner = None

    @property
    def runner(self):
        """The inference runner for the chosen backend (built on first use)."""
        if self._runner is None:
            onnx_file = self.directory / ONNX_FILE if self.directory is not None else None
            has_onnx = onnx_file is not None and onnx_file.is_file()
            if self.backend == "onnx" and not has_onnx:
                raise BundleError(f"backend 'onnx' needs {ONNX_FILE} in the bundle directory; "
                                  "run `hematoscope export BUNDLE --format onnx` first")
            if has_onnx and self.backend in ("auto", "onnx"):
                from hematoscope.export.onnx import OnnxRunner

                self._runner = OnnxRunner(onnx_file)
            else:
                self._runner = TorchRunner(self.net)
        return self._runner

    def forward(self, images: Sequence[np.ndarray]) -> ModelOutput:
        """RGB uint8 images of any size → logits (N, C) and pooled features (N, D)."""
        x = self.preprocess(images)
        if len(x) == 0:
            return ModelOutput(np.zeros((0, len(self.labels)), np.float32),
                               np.zeros((0, self.config.model.get("num_features", 0)), np.float32))
        logits, features = self.runner.run(x)
        return ModelOutput(np.asarray(logits, dtype=np.float32),
                           None if features is None else np.asarray(features, dtype=np.float32))

    def forward_tensor(self, x: np.ndarray) -> ModelOutput:
        """Already preprocessed float32 NCHW input → outputs (used by evaluation and export checks)."""
        logits, features = self.runner.run(np.ascontiguousarray(x, dtype=np.float32))
        return ModelOutput(np.asarray(logits, np.float32), None if features is None else np.asarray(features, np.float32))

    # --- persistence -------------------------------------------------------------------
    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        dtype = _DTYPES[self.config.model.get("dtype", "float32")]
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in self.net.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "arch": self.config.model["arch"]})

    @classmethod
    def _load_weights(cls, config: BundleConfig, directory: Path, metrics: dict) -> "NeuralBundle":
        from safetensors.torch import load_file

        for key in ("arch",):
            if key not in config.model:
                raise BundleError(f"{directory}/config.json: model.{key} is missing")
        weights_file = directory / WEIGHTS_FILE
        if not weights_file.is_file():
            raise BundleError(f"{directory} has no {WEIGHTS_FILE}")
        bundle = cls(config, metrics=metrics, directory=directory)
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights_file)).items()}
        try:
            bundle.net.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{weights_file} does not match architecture {config.model['arch']!r} "
                              f"with {len(config.labels)} classes: {str(exc)[:300]}") from None
        return bundle
