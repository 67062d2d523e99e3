"""The "neural" bundle kind: a timm CNN fine-tuned end to end.

Files: ``model.safetensors`` holds the timm model's own state dict (so it is also a valid
``weights=`` file for :func:`hematoscope.models.backbones.create_backbone`); fp16 on disk when
``config.model.dtype == "float16"``, always float32 in memory. An optional ``model.onnx``
(written by ``hematoscope export``) is used for inference when the backend allows it.

Backends (``backend=`` argument, or the ``HEMATOSCOPE_BACKEND`` environment variable):
``"auto"`` (ONNX Runtime when the bundle directory has ``model.onnx``, torch otherwise),
``"torch"`` or ``"onnx"``.

torch is imported only when the network is needed (the torch backend, training, export, Grad-CAM):
a bundle served by ONNX Runtime starts in a fraction of a second. The network and its weights are
then built on first access of :attr:`NeuralBundle.net`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from hematoscope import _io
from hematoscope.bundle.base import (Bundle, BundleConfig, BundleError, ModelOutput, ViewOutputs, calibrated_softmax,
                                    cascade_gate, register_bundle_kind)
from hematoscope.bundle.neural_onnx import ONNX_FILE
from hematoscope.models.backbones import DEFAULT_ARCH, OFFLINE_WEIGHTS, create_backbone
from hematoscope.models.preprocess import Preprocess, dihedral_views

if TYPE_CHECKING:
    from hematoscope.bundle.neural_torch import ClassifierNet

log = logging.getLogger("hematoscope")

WEIGHTS_FILE = "model.safetensors"
BACKEND_ENV = "HEMATOSCOPE_BACKEND"
BACKENDS = ("auto", "torch", "onnx")
WEIGHT_DTYPES = ("float32", "float16")
#: BatchNorm mixes (share of the new lab's statistics) that ``adapt`` chooses among.
MIX_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def __getattr__(name: str):
    # The torch classes live in neural_torch so that importing this module does not import torch.
    if name in ("ClassifierNet", "TorchRunner"):
        from hematoscope.bundle import neural_torch

        return getattr(neural_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pooled_width(model) -> int:
    """Width of the features ClassifierNet returns (timm's head_hidden_size when the head has its
    own hidden layer, as in MobileNetV3)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


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

    ``config.tta`` > 1 averages logits and features over that many flip/rot90 views.

    Args:
        config: the bundle config (``config.model`` = arch, num_features, weights_source, dtype).
        net: the network; built from ``config`` when None (random weights).
        metrics: metrics recorded with the bundle.
        path: where the bundle was loaded from.
        directory: the unpacked bundle directory (where ``model.onnx`` is looked for).
        backend: ``"auto"``, ``"torch"`` or ``"onnx"``; None reads ``$HEMATOSCOPE_BACKEND``.
    """

    supports_tta = True
    weight_files = (WEIGHTS_FILE, ONNX_FILE)
    explanation_methods = ("grad-cam",)
    backends = ("torch", "onnx")
    adaptable = True

    def __init__(self, config: BundleConfig, net: "ClassifierNet | None" = None, metrics: dict | None = None,
                 path: Path | None = None, *, directory: Path | None = None, backend: str | None = None):
        super().__init__(config, metrics, path)
        self._net = net
        self._weights_file: Path | None = None  # read into the network on first access of .net
        self.directory = directory
        self.backend = resolve_backend(backend)
        self._runner = None

    @property
    def net(self) -> "ClassifierNet":
        """The torch network (built, and its weights read, on first access)."""
        if self._net is None:
            from hematoscope.bundle.neural_torch import ClassifierNet

            net = ClassifierNet(create_backbone(self.config.model.arch, num_classes=len(self.config.labels),
                                                weights=None, norm=self.config.model.norm))
            if self._weights_file is not None:
                _load_state(net, self._weights_file, self.config)
            self._net = net
        return self._net

    def torch_module(self) -> "ClassifierNet":
        """The torch network (see :attr:`net`)."""
        return self.net

    @net.setter
    def net(self, value: "ClassifierNet") -> None:
        self._net = value

    @classmethod
    def create(cls, labels: Sequence[str], *, arch: str = DEFAULT_ARCH, preprocess: Preprocess | None = None,
               weights: str | Path | None = OFFLINE_WEIGHTS, name: str = "untrained", dtype: str = "float32",
               drop_rate: float = 0.0, norm: str = "batch", backend: str | None = None) -> "NeuralBundle":
        """A new bundle: backbone ``arch`` with ``weights`` and a fresh classifier for ``labels``.

        Args:
            labels: canonical class names, in output order.
            arch: timm architecture name.
            preprocess: input spec (default: 128 px squash, ImageNet normalisation).
            weights: backbone weights (see :func:`create_backbone`); None = random.
            name: bundle name.
            dtype: on-disk weight dtype, ``"float32"`` or ``"float16"``.
            drop_rate: dropout before the classifier (training only).
            norm: normalisation layers (see models.backbones.NORMS).
            backend: inference backend (see module docstring).

        Raises:
            WeightsError: unknown architecture or unloadable weights.
            ValueError: bad dtype or fewer than two labels.
        """
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(WEIGHT_DTYPES)}; got {dtype!r}")
        preprocess = preprocess or Preprocess(size=128)
        model = create_backbone(arch, num_classes=len(labels), weights=weights, drop_rate=drop_rate, norm=norm)
        config = BundleConfig(
            kind="neural", name=name, labels=list(labels), preprocess=preprocess.to_dict(),
            model={"arch": arch, "num_features": _pooled_width(model),
                   "weights_source": None if weights is None else str(weights), "dtype": dtype,
                   **({} if norm == "batch" else {"norm": norm})},  # bundles without it read as "batch"
        )
        from hematoscope.taxonomy import TAXONOMY

        from hematoscope.bundle.neural_torch import ClassifierNet

        config.taxonomy_version = TAXONOMY.version
        return cls(config, ClassifierNet(model), backend=backend)

    # --- inference ---------------------------------------------------------------------
    def use_backend(self, backend: str | None, *, threads: int | None = None) -> None:
        """Switch the inference backend (``"auto"``, ``"torch"``, ``"onnx"``; None = environment)
        and get it ready, so an unusable one fails here rather than at the first batch.

        Args:
            backend: the backend.
            threads: intra-op threads for it (None: ONNX Runtime's default of the physical cores;
                torch keeps its own setting).

        Raises:
            BundleError: unknown backend, or ``"onnx"`` without ``model.onnx``.
        """
        self.backend = resolve_backend(backend)
        self._runner = None
        if threads and self._uses_onnx():  # one session sized to the caller's CPUs
            from hematoscope.bundle.neural_onnx import OnnxRunner

            self._runner = OnnxRunner(self.directory / ONNX_FILE, threads=threads)
        elif threads:
            from hematoscope._extras import require

            require("torch", extra="train", purpose="running a bundle with PyTorch").set_num_threads(threads)
        self.runner  # noqa: B018 (built now: fail early)

    def twin(self) -> "NeuralBundle":
        self.runner  # noqa: B018 (built before copying, so every twin shares one runner)
        return super().twin()

    @property
    def active_backend(self) -> str:
        """``"onnx"`` or ``"torch"``: what runs the network with the chosen backend."""
        return "onnx" if self._uses_onnx() else "torch"

    def _has_onnx(self) -> bool:
        return self.directory is not None and (self.directory / ONNX_FILE).is_file()

    def _uses_onnx(self) -> bool:
        if self.backend == "onnx" and not self._has_onnx():
            raise BundleError(f"backend 'onnx' needs {ONNX_FILE} in the bundle directory; "
                              "run `hematoscope export BUNDLE --format onnx` first")
        return self.backend in ("auto", "onnx") and self._has_onnx()

    @property
    def runner(self):
        """The inference runner for the chosen backend (built on first use)."""
        if self._runner is None:
            if self._uses_onnx():
                from hematoscope.bundle.neural_onnx import OnnxRunner

                self._runner = OnnxRunner(self.directory / ONNX_FILE)
            else:
                from hematoscope.bundle.neural_torch import TorchRunner

                self._runner = TorchRunner(self.net)
        return self._runner

    def forward(self, images: Sequence[np.ndarray]) -> ModelOutput:
        """RGB uint8 images of any size → logits (N, C) and pooled features (N, D)."""
        x = self.preprocess(images)
        if len(x) == 0:
            return ModelOutput(np.zeros((0, len(self.labels)), np.float32),
                               np.zeros((0, self.config.model.num_features or 0), np.float32))
        return self.forward_tensor(x)

    def forward_tensor(self, x: np.ndarray) -> ModelOutput:
        """Already preprocessed float32 NCHW input → outputs, averaged over ``config.tta`` views."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = [self.runner.run(v) for v in dihedral_views(x, self.config.tta)]
        logits = _average([o[0] for o in outs])
        return ModelOutput(logits, None if outs[0][1] is None else _average([o[1] for o in outs]))

    def forward_views(self, images: Sequence[np.ndarray], views: int = 8) -> ViewOutputs:
        """Every one of the first ``views`` views' raw outputs, not averaged
        (:class:`~hematoscope.bundle.base.ViewOutputs`, view 0 = the image itself)."""
        x = np.ascontiguousarray(self.preprocess(images), dtype=np.float32)
        outs = [self.runner.run(v) for v in dihedral_views(x, views)]
        feats = None if outs[0][1] is None else np.stack([o[1] for o in outs])
        return ViewOutputs(np.stack([o[0] for o in outs]), feats)

    def predict_arrays(self, images: Sequence[np.ndarray], sources: Sequence[str]):
        """Classify one batch of decoded images: with the cascade when the bundle has one (see
        :meth:`predict_cascade`), else with ``config.tta`` views."""
        if not self.uses_cascade or len(images) == 0:
            return super().predict_arrays(images, sources)
        return self.predict_cascade(images, sources)

    def predict_cascade(self, images: Sequence[np.ndarray], sources: Sequence[str]):
        """The adaptive-view cascade on a batch: ``fast_views`` for every image, the remaining
        views of ``slow_views`` only for the images the rule finds uncertain; each image is
        answered with the trust fitted for the views it got (``Prediction.views``). With a
        framing search (:meth:`_reframe`), every image the fast pass flags as unlike the training
        data takes the slow path, where the search runs with ``slow_views`` views (the framing is
        chosen on the steadier many-view OOD score).

        The slow answers equal those of ``forward_tensor`` with ``slow_views`` views (the fast
        views' outputs are reused, not recomputed).
        """
        rule = self.config.cascade
        fast_outs = self.forward_views(images, rule.fast_views)
        fast = self.decide(fast_outs.averaged(rule.fast_views), sources, views=rule.fast_views)
        uncertain = cascade_gate(fast.confidence, fast.ood_score, min_confidence=rule.min_confidence,
                                 max_ood=rule.max_ood, reject_ood=rule.reject_ood)
        if self.reframes:
            uncertain |= fast.ood_flag
            self._mark_unsearched(fast)
        take = np.flatnonzero(uncertain)
        if len(take) == 0:
            return fast
        chosen, names = [images[i] for i in take], [sources[i] for i in take]
        x = np.ascontiguousarray(self.preprocess(chosen), dtype=np.float32)
        rest = [self.runner.run(v) for v in dihedral_views(x, rule.slow_views)[rule.fast_views:]]
        slow_outs = ViewOutputs(
            np.concatenate([fast_outs.logits[:, take], np.stack([o[0] for o in rest])]),
            None if fast_outs.features is None else np.concatenate([fast_outs.features[:, take],
                                                                    np.stack([o[1] for o in rest])]))
        slow = self.decide(slow_outs.averaged(rule.slow_views), names, views=rule.slow_views)
        if self.reframes:
            slow = self._reframe(chosen, names, slow, rule.slow_views)
        fast.replace(take, slow)
        return fast

    def _adapt_statistics(self, images: Sequence[np.ndarray], *, batch_size: int = 64,
                          mix: float | None = None) -> dict:
        """AdaBN: every BatchNorm layer's running mean and variance re-estimated on ``images``
        and mixed with the trained ones, ``mix`` * new + (1 - ``mix``) * trained; weights untouched.

        ``mix=None`` chooses it among 0, 0.25, ... 1 as the one with the lowest mean prediction
        entropy on ``images`` (unlabelled: the most decisive model). A model trained with strong
        colour randomisation loses accuracy from full re-estimation (on LISC: macro-F1 0.65 as
        trained, 0.59 with mix 1, 0.65 with mix 0.25, the lowest-entropy choice), a model trained
        without it gains (0.34 → 0.53 with mix 1): the entropy tells the two apart. An exported
        ``model.onnx`` no longer matches, so inference falls back to torch until exported again."""
        from hematoscope._extras import require

        torch = require("torch", "timm", extra="train", purpose="adapting a neural bundle (BatchNorm statistics)")

        from hematoscope.bundle.neural_torch import TorchRunner, adapt_batchnorm, batchnorm_statistics

        trained = {k: v.clone() for k, v in batchnorm_statistics(self.net).items()}
        if not trained:  # e.g. GroupNorm: statistics come from each image already
            return {"method": "none (the network has no BatchNorm layers; its normalisation uses each image's "
                              "own statistics)", "batchnorm_layers": 0}
        batches = [torch.from_numpy(self.preprocess(images[i:i + batch_size]))
                   for i in range(0, len(images), batch_size)]
        layers = adapt_batchnorm(self.net, batches)
        new = {k: v.clone() for k, v in batchnorm_statistics(self.net).items()}

        def use(m: float) -> None:
            for name, stat in batchnorm_statistics(self.net).items():
                stat.copy_(m * new[name] + (1 - m) * trained[name])

        entropy = {}
        if mix is None:
            from scipy.special import entr  # -p log p, 0 at p = 0

            runner = TorchRunner(self.net)
            for m in MIX_GRID:
                use(m)
                logits = np.concatenate([runner.run(x.numpy())[0] for x in batches])
                entropy[m] = float(entr(calibrated_softmax(logits)).sum(1).mean())
            mix = min(entropy, key=entropy.get)
        if not 0 <= mix <= 1:
            raise BundleError(f"mix must be in [0, 1]; got {mix}")
        use(mix)
        self._network_changed()
        return {"method": f"AdaBN (BatchNorm running mean/variance re-estimated, mixed {mix:g} new : "
                          f"{1 - mix:g} trained)", "batchnorm_layers": layers, "mix": mix,
                "mix_chosen_by": "lowest mean prediction entropy" if entropy else "user",
                "mean_entropy_by_mix": {f"{m:g}": round(e, 4) for m, e in entropy.items()}}

    def _tune_unlabelled(self, images: Sequence[np.ndarray], *, classes: Sequence[int], epochs: int,
                         seed: int = 0, class_mix: Sequence[float] | None = None) -> dict:
        """SHOT-style tuning of the network (all but the classifier layer) on a lab's unlabelled
        ``images``, answers among ``classes`` in about the shares ``class_mix`` (None = equal)
        (:func:`~hematoscope.bundle.neural_torch.tune_unlabelled`); docs/crosslab.md has what it
        does on LISC."""
        from hematoscope._extras import require

        torch = require("torch", "timm", extra="train", purpose="tuning a neural bundle on a lab's images")

        from hematoscope.bundle.neural_torch import tune_unlabelled

        x = torch.from_numpy(np.concatenate([self.preprocess(images[i:i + 64]) for i in range(0, len(images), 64)]))
        losses = tune_unlabelled(self.net, x, list(classes), epochs=epochs, seed=seed, class_mix=class_mix)
        self._network_changed()
        return {"method": "SHOT information maximisation, mean answer held to "
                          + ("equal shares" if class_mix is None else "the lab's class mix")
                          + " + centroid pseudo-labels (network and BatchNorm statistics tuned, classifier layer "
                          "fixed)", "epochs": epochs,
                "loss_by_epoch": [round(v, 4) for v in losses]}

    def _network_changed(self) -> None:
        """After the network was changed in memory: its directory's files (``model.onnx`` above
        all) no longer match it, so inference runs it with torch until it is exported again."""
        self.directory, self._runner = None, None
        self.config.model.clear("onnx")

    # --- persistence -------------------------------------------------------------------
    def _kept_files(self, target: Path) -> dict[str, Path]:
        """The exported ``model.onnx`` goes along when it still computes this network: saved back
        home (trust does not change the raw outputs), or anywhere (a zip, a copy) while the weights
        are those it was exported and checked from. After the weights changed it is not carried."""
        kept = super()._kept_files(target)
        if self._has_onnx() and (self._home(target) is not None or self._weights_unchanged()):
            kept[ONNX_FILE] = self.directory / ONNX_FILE
        return kept

    def _weights_unchanged(self) -> bool:
        """Whether the network still has the weights of the file it was loaded from."""
        if self._weights_file is None:
            return False
        if self._net is None:  # never built: ONNX Runtime ran it, the file is the state
            return True
        from hematoscope.bundle.neural_torch import same_state

        return same_state(self._weights_file, self._weights_state(), self._weights_metadata())

    def _save_weights(self, directory: Path) -> None:
        if self._net is None and self._weights_file is not None:
            # never built (ONNX Runtime ran it): the file read at load is the state, byte for byte
            _io.write_bytes(directory / WEIGHTS_FILE, self._weights_file.read_bytes())
            return
        from safetensors.torch import save_file

        from hematoscope.bundle.neural_torch import same_state

        state, metadata = self._weights_state(), self._weights_metadata()
        if self._weights_file is not None and same_state(self._weights_file, state, metadata):
            # unchanged since load: keep the file's bytes (safetensors orders metadata keys at random)
            _io.write_bytes(directory / WEIGHTS_FILE, self._weights_file.read_bytes())
            return
        with _io.atomic_path(directory / WEIGHTS_FILE, ".safetensors") as tmp:  # and readable by others
            save_file(state, str(tmp), metadata=metadata)

    def _weights_state(self) -> dict:
        """The network's tensors as the weights file stores them (in the bundle's dtype)."""
        from hematoscope.bundle.neural_torch import DTYPES

        dtype = DTYPES[self.config.model.dtype]
        return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                for k, v in self.net.model.state_dict().items()}

    def _weights_metadata(self) -> dict[str, str]:
        return {"format": "pt", "arch": self.config.model.arch}

    @classmethod
    def _load_weights(cls, config: BundleConfig, directory: Path, metrics: dict) -> "NeuralBundle":
        weights_file = directory / WEIGHTS_FILE
        if not weights_file.is_file():
            raise BundleError(f"{directory} has no {WEIGHTS_FILE}")
        bundle = cls(config, metrics=metrics, directory=directory)
        bundle._weights_file = weights_file
        if not (bundle.backend in ("auto", "onnx") and bundle._has_onnx()):
            bundle.net  # torch will run it: read the weights now, so a bad file fails at load time
        return bundle


def _average(arrays: list[np.ndarray]) -> np.ndarray:
    """Mean of per-view outputs, as float32: what `ViewOutputs.averaged` gives the cascade, so its slow
    answers equal forward_tensor's."""
    return np.asarray(arrays[0] if len(arrays) == 1 else np.mean(arrays, axis=0), dtype=np.float32)


def _load_state(net: "ClassifierNet", weights_file: Path, config: BundleConfig) -> None:
    state = {k: (v.float() if v.is_floating_point() else v)
             for k, v in _io.read_safetensors(weights_file, "pt").items()}
    try:
        net.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights_file} does not match architecture {config.model.arch!r} "
                          f"with {len(config.labels)} classes: {str(exc)[:300]}") from None
