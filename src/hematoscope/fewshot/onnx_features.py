"""ONNX Runtime backend for timm feature extractors: export once, check parity, reuse.

Eager PyTorch on a 2-core CPU is the bottleneck of few-label work with test-time views (8
forward passes per image at 224 px). The same network, pooling included (mean and standard
deviation over space of the last intermediate blocks, or the model's own pooled output), is
exported once to an ONNX file in the feature cache (``cache_dir("features", "onnx")``, named by
the extractor's cache key) and run by ONNX Runtime (:class:`hematoscope.bundle.neural_onnx.OnnxRunner`).

Before a new file is used its features are compared with PyTorch's on real cell images (the
bundled PBC samples): cosine similarity >= :data:`MIN_COSINE` for every image and a largest
absolute difference <= :data:`MAX_ABS_DIFF` times the largest feature magnitude; otherwise the
export is refused with :class:`FeatureOnnxError` and the caller falls back to PyTorch. The
features of both backends are interchangeable, so they share one feature cache.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hematoscope import _io

if TYPE_CHECKING:
    from hematoscope.fewshot.features import TimmFeatureExtractor

log = logging.getLogger("hematoscope")

#: Smallest allowed cosine similarity between ONNX and PyTorch features of one image.
MIN_COSINE = 0.99999
#: Largest allowed |ONNX - PyTorch| feature difference, relative to the largest |feature|.
MAX_ABS_DIFF = 1e-3
OPSET = 17
#: Bump when the exported graph changes, so stale files in the cache are not reused.
GRAPH_VERSION = 1


class FeatureOnnxError(RuntimeError):
    """The feature network could not be exported, or its ONNX features differ from PyTorch's."""


def onnx_path(extractor: "TimmFeatureExtractor") -> Path:
    """Where the ONNX file of ``extractor``'s network lives in the feature cache."""
    from hematoscope.paths import cache_dir

    return cache_dir("features", "onnx") / f"{extractor.network_key}-g{GRAPH_VERSION}.onnx"


def _pooling_module(extractor: "TimmFeatureExtractor"):
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = extractor.model

        def forward(self, x):
            return extractor._pool(x)

    return Pooled().eval()


def _parity_input(extractor: "TimmFeatureExtractor") -> np.ndarray:
    from hematoscope.data.images import load_image
    from hematoscope.samples import sample_paths

    paths = sample_paths()[::3] or []
    images = [load_image(p) for p in paths]
    if not images:  # installed without the samples: generated cells
        from hematoscope.data.synthetic import synthetic_cell

        rng = np.random.default_rng(0)
        images = [synthetic_cell(lab, rng, 96) for lab in ("neutrophil", "lymphocyte", "eosinophil", "monocyte")]
    return extractor.preprocess(images)


def check_parity(reference: np.ndarray, features: np.ndarray) -> dict[str, float]:
    """Compare ONNX features with PyTorch's; returns the measures, raises when they differ.

    Raises:
        FeatureOnnxError: shapes differ, a cosine is below :data:`MIN_COSINE` or the largest
            difference above :data:`MAX_ABS_DIFF` of the largest magnitude.
    """
    if reference.shape != features.shape:
        raise FeatureOnnxError(f"ONNX features have shape {features.shape}, PyTorch {reference.shape}")
    a, b = reference.astype(np.float64), features.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    rel = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
    out = {"min_cosine": float(cos.min()), "max_rel_diff": rel}
    if not (out["min_cosine"] >= MIN_COSINE and rel <= MAX_ABS_DIFF):
        raise FeatureOnnxError(f"ONNX features differ from PyTorch's: min cosine {out['min_cosine']:.6f} "
                               f"(need >= {MIN_COSINE}), max relative difference {rel:.2e} (limit {MAX_ABS_DIFF:.0e})")
    return out


def export_features_onnx(extractor: "TimmFeatureExtractor", path: Path | None = None) -> Path:
    """Export ``extractor``'s network + pooling to ONNX (dynamic batch), check it against PyTorch
    on real cells, and write it atomically to ``path`` (default :func:`onnx_path`).

    Reuses an existing file without checking again (it was checked when written).

    Raises:
        FeatureOnnxError: the export failed or its features differ from PyTorch's.
    """
    import warnings

    import torch

    from hematoscope.bundle.neural_onnx import OnnxRunner

    path = path or onnx_path(extractor)
    if path.is_file():
        return path
    module = _pooling_module(extractor)
    x = _parity_input(extractor)
    with tempfile.TemporaryDirectory(prefix="hematoscope-feat-onnx-") as tmp:
        tmp_file = Path(tmp) / "features.onnx"
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (torch.from_numpy(x[:2]),), str(tmp_file), dynamo=False,
                                  input_names=["images"], output_names=["features"], opset_version=OPSET,
                                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                                  do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: use PyTorch
            raise FeatureOnnxError(f"ONNX export of {extractor.identity} failed: {str(exc)[:300]}") from exc
        with torch.inference_mode():
            reference = module(torch.from_numpy(x)).float().numpy()
        runner = OnnxRunner(tmp_file, threads=1)
        got = np.concatenate([runner.run(x[i:i + 3])[0] for i in range(0, len(x), 3)])  # batch axis is dynamic
        measures = check_parity(reference, got)
        log.info("feature ONNX parity on %d images: %s", len(x), measures)
        _io.write_bytes(path, tmp_file.read_bytes())
    return path


class OnnxFeatureRunner:
    """Runs an exported feature network with ONNX Runtime: float32 NCHW → (N, D) features."""

    def __init__(self, path: Path | str, threads: int | None = None):
        from hematoscope.bundle.neural_onnx import OnnxRunner

        self.path = Path(path)
        self._runner = OnnxRunner(self.path, threads=threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._runner.run(x)[0]
