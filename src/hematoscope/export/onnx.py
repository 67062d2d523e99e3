"""ONNX export of neural bundles, checked against PyTorch before anything is written.

:func:`export_onnx` writes ``model.onnx`` into a bundle: a dynamic-batch graph with two outputs,
``logits`` and the pooled ``features`` (so out-of-distribution scoring works the same as with
torch). Before anything is written it checks parity on real cell images: for float32 the
calibrated probabilities may differ from PyTorch's by at most 1e-4, for int8 the top-1 class must
agree with float32 on at least ``min_agreement`` of the images. The result is recorded in
``config.model.onnx``.

The runner that executes ``model.onnx`` at prediction time lives with the bundle
(:class:`hematoscope.bundle.neural_onnx.OnnxRunner`), beside the torch runner.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from hematoscope import _io
from hematoscope.bundle.neural_onnx import ONNX_FILE, OnnxRunner

if TYPE_CHECKING:
    import pandas as pd

    from hematoscope.bundle.base import Bundle

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "features")
DEFAULT_OPSET = 17
#: Largest allowed |probability difference| between the float32 ONNX model and PyTorch.
FP32_TOLERANCE = 1e-4
#: Smallest allowed top-1 agreement between an int8 model and the float32 model.
DEFAULT_MIN_AGREEMENT = 0.98
QUANTIZATIONS = ("int8",)
_CALIBRATION_BATCH = 16


class ExportError(ValueError):
    """The bundle cannot be exported, or the exported model failed its parity check."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how the exported model compares with PyTorch."""

    onnx_path: str
    bundle_dir: str
    opset: int
    precision: str  # "float32" or "int8"
    parity_images: int
    parity_source: str
    max_prob_diff: float  # float32 ONNX vs PyTorch, calibrated probabilities
    int8_max_prob_diff: float | None = None  # int8 ONNX vs PyTorch, on the same images
    top1_agreement: float | None = None  # int8 vs float32
    agreement_images: int | None = None
    agreement_source: str | None = None
    accuracy: dict[str, Any] | None = None  # {"float32", "int8", "n"} on the validation table
    size_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    bundle: "Bundle",
    out_dir: Path | str | None = None,
    *,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    validation: "pd.DataFrame | Path | str | None" = None,
    calibration: Sequence[Path | str] | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> ExportReport:
    """Export a neural bundle to ONNX, check it against PyTorch, and record it in the bundle.

    Args:
        bundle: a loaded :class:`~hematoscope.bundle.neural.NeuralBundle`.
        out_dir: write a copy of the bundle here, with ``model.onnx``; None = add ``model.onnx``
            to the bundle's own directory.
        quantize: None (float32) or ``"int8"`` (static QDQ quantisation, per-channel weights,
            calibrated on ``calibration`` images).
        opset: ONNX opset (>= 17).
        validation: a samples table or dataset path (any registered reader or split file; only
            its ``val`` rows when it has a split column). With ``quantize``, int8 and float32
            are compared on it (top-1 agreement, and accuracy where labels are known).
        calibration: images for int8 calibration (default: the bundled PBC samples).
        min_agreement: with ``quantize``, refuse when int8/float32 top-1 agreement is below this.

    Returns:
        The :class:`ExportReport` (also stored in ``config.model.onnx``).

    Raises:
        ExportError: not a neural bundle, no place to write, bad arguments, or the exported
            model failed its parity check (nothing is written then).
        MissingExtraError: torch or onnx is not installed (the ``train`` extra).
    """
    from hematoscope._extras import require

    start = time.perf_counter()
    # what needs no torch first: a refusal comes at once, not after seconds of imports
    if "onnx" not in bundle.backends:
        raise ExportError(f"only neural bundles can be exported to ONNX; this one is {bundle.kind!r}")
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"quantize must be None or one of {QUANTIZATIONS}; got {quantize!r}")
    if opset < 17:
        raise ExportError(f"opset must be >= 17; got {opset}")
    target = _target_dir(bundle, out_dir)
    require("torch", "onnx", extra="train", purpose="ONNX export")
    bundle.torch_module()
    parity_x, parity_source = _parity_inputs(bundle)

    with tempfile.TemporaryDirectory(prefix="hematoscope-onnx-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        _torch_export(bundle, fp32_path, parity_x[:2], opset)
        max_diff = _check_fp32_parity(bundle, fp32_path, parity_x)
        report = ExportReport(
            onnx_path=str(target / ONNX_FILE), bundle_dir=str(target), opset=opset, precision="float32",
            parity_images=len(parity_x), parity_source=parity_source, max_prob_diff=max_diff,
        )
        final = fp32_path
        if quantize == "int8":
            final = Path(tmp) / "int8.onnx"
            calib_x = _preprocessed(bundle, calibration) if calibration else parity_x
            _quantize_int8(fp32_path, final, calib_x, Path(tmp))
            _check_int8(bundle, fp32_path, final, validation, parity_x, parity_source, min_agreement, report)
            report.precision = "int8"

        report.size_bytes = final.stat().st_size
        _record(bundle, report)
        if out_dir is not None:
            bundle.save(target)  # the copy, without the old bundle's model.onnx
        _io.write_bytes(target / ONNX_FILE, final.read_bytes())
        if out_dir is None:
            bundle.save(target)  # config and card only: the weights' bytes are unchanged, model.onnx is kept
    report.seconds = round(time.perf_counter() - start, 2)
    if bundle.directory is not None and Path(bundle.directory) == target:
        bundle.use_backend(bundle.backend)  # pick up the new model.onnx on the next forward
    return report


# --- steps ---------------------------------------------------------------------------------
def _target_dir(bundle: "Bundle", out_dir: Path | str | None) -> Path:
    if out_dir is not None:
        if Path(out_dir).suffix.lower() == ".zip":  # refused before anything is written
            raise ExportError(f"the export is written to a directory, not {Path(out_dir).name}: give --out DIR "
                              "(its bundle then zips with its ONNX file: load_bundle(DIR).save('model.zip'))")
        return Path(out_dir)
    directory = bundle.directory
    if bundle.path is None or directory is None or not Path(bundle.path).is_dir():
        where = "was loaded from a .zip" if bundle.path is not None else "has not been saved"
        raise ExportError(f"this bundle {where}: give an output directory (--out DIR) for the exported copy")
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    if Path(directory).resolve() == DEFAULT_MODEL_DIR:  # part of the installed package, shared by every user
        raise ExportError("the shipped default model is part of the installed package and already carries "
                          "model.onnx; give an output directory (--out DIR) for an exported copy")
    return Path(directory)


def _parity_inputs(bundle: "Bundle") -> tuple[np.ndarray, str]:
    """The model input for the bundled real PBC sample images (generated cells only when the
    package was installed without them)."""
    from hematoscope.samples import sample_paths

    paths = sample_paths()
    if paths:
        return _preprocessed(bundle, paths), f"{len(paths)} bundled PBC sample images"
    from hematoscope.data.synthetic import synthetic_cell

    rng = np.random.default_rng(0)
    labels = ["neutrophil", "lymphocyte", "eosinophil", "monocyte"]
    images = [synthetic_cell(labels[i % len(labels)], rng, 96) for i in range(16)]
    return bundle.preprocess(images), "16 generated cell images (no bundled samples found)"


def _preprocessed(bundle: "Bundle", paths: Iterable[Path | str]) -> np.ndarray:
    from hematoscope.data.images import ImageError, load_model_image

    images = []
    for p in paths:
        try:
            images.append(load_model_image(p, bundle.preprocess))
        except ImageError:
            continue  # a bad calibration file is not a reason to fail the export
    if not images:
        raise ExportError("no readable images to check the exported model on")
    return bundle.preprocess(images)


def _torch_export(bundle: "Bundle", path: Path, example: np.ndarray, opset: int) -> None:
    import warnings

    import onnx
    import torch

    net = bundle.torch_module().eval()
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter needs no extra package (the dynamo one needs onnxscript).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.from_numpy(np.ascontiguousarray(example)),), str(path), dynamo=False,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset,
            dynamic_axes={INPUT_NAME: batch, **{name: batch for name in OUTPUT_NAMES}},
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    meta = {
        "hematoscope.labels": ",".join(bundle.labels),
        "hematoscope.preprocess": _json(bundle.preprocess.to_dict()),
        "hematoscope.bundle": bundle.name,
    }
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))


def _check_fp32_parity(bundle: "Bundle", path: Path, x: np.ndarray) -> float:
    from hematoscope.bundle.neural_torch import TorchRunner

    ref_logits, ref_feats = TorchRunner(bundle.torch_module()).run(x)
    runner = OnnxRunner(path)
    logits, feats = runner.run(x)
    single, _ = runner.run(x[:1])  # the batch axis really is dynamic
    diff = float(np.abs(bundle.calibrated_probs(logits) - bundle.calibrated_probs(ref_logits)).max())
    diff = max(diff, float(np.abs(bundle.calibrated_probs(single) - bundle.calibrated_probs(ref_logits[:1])).max()))
    if feats is None or feats.shape != ref_feats.shape:
        raise ExportError("the exported model does not output the pooled features")
    if not diff < FP32_TOLERANCE:
        raise ExportError(f"exported model differs from PyTorch: max |Δ probability| = {diff:.2e} "
                          f"(limit {FP32_TOLERANCE:.0e}); nothing was written")
    return diff


def _quantize_int8(fp32_path: Path, out_path: Path, calib_x: np.ndarray, tmp: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(calib_x), _CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            i = next(self._it, None)
            return None if i is None else {INPUT_NAME: calib_x[i:i + _CALIBRATION_BATCH]}

    prepared = tmp / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _check_int8(bundle: "Bundle", fp32_path: Path, int8_path: Path, validation, parity_x: np.ndarray,
                parity_source: str, min_agreement: float, report: ExportReport) -> None:
    fp32, int8 = OnnxRunner(fp32_path), OnnxRunner(int8_path)
    from hematoscope.bundle.neural_torch import TorchRunner

    ref_logits, _ = TorchRunner(bundle.torch_module()).run(parity_x)
    report.int8_max_prob_diff = float(np.abs(bundle.calibrated_probs(int8.run(parity_x)[0])
                                             - bundle.calibrated_probs(ref_logits)).max())
    if validation is not None:
        table = _validation_table(validation)
        from hematoscope.data.samples import class_column
        from hematoscope.data.sources import ImageSource

        items = [ImageSource(str(p), Path(p)) for p in table["path"]]
        truth = dict(zip(table["path"].astype(str), class_column(table)))
        pred32, pred8, names = [], [], []
        for batch in bundle.iter_batches(items, batch_size=64):
            if not batch.images:
                continue
            x = bundle.preprocess(batch.images)
            pred32.append(fp32.run(x)[0].argmax(1))
            pred8.append(int8.run(x)[0].argmax(1))
            names.extend(batch.sources)
        if not names:
            raise ExportError("the validation data has no readable images")
        p32, p8 = np.concatenate(pred32), np.concatenate(pred8)
        source = f"{len(names)} validation images"
        labels = np.array(bundle.labels)
        known = np.array([truth[n] in bundle.labels for n in names])
        if known.any():
            y = np.array([truth[n] for n in names])[known]
            report.accuracy = {"float32": round(float(np.mean(labels[p32[known]] == y)), 5),
                               "int8": round(float(np.mean(labels[p8[known]] == y)), 5), "n": int(known.sum())}
    else:
        p32, p8 = fp32.run(parity_x)[0].argmax(1), int8.run(parity_x)[0].argmax(1)
        source = parity_source
    report.top1_agreement = round(float(np.mean(p32 == p8)), 5)
    report.agreement_images, report.agreement_source = len(p32), source
    if report.top1_agreement < min_agreement:
        raise ExportError(f"int8 model agrees with float32 on only {report.top1_agreement:.2%} of top-1 classes "
                          f"({source}; required {min_agreement:.2%}); nothing was written")


def _validation_table(validation) -> "pd.DataFrame":
    from hematoscope.data.readers import as_table

    table = as_table(validation)
    if "split" in table.columns and (table["split"] == "val").any():
        table = table[table["split"] == "val"]
    if table.empty:
        raise ExportError("the validation table is empty")
    return table


def _record(bundle: "Bundle", report: ExportReport) -> None:
    """The ONNX facts, into the bundle's config (saved with it, shown in its model card)."""
    bundle.config.model.onnx = {
        "file": ONNX_FILE, "opset": report.opset, "precision": report.precision,
        "parity": {k: v for k, v in report.to_dict().items()
                   if k in ("parity_images", "parity_source", "max_prob_diff", "int8_max_prob_diff", "top1_agreement",
                            "agreement_images", "agreement_source", "accuracy")},
    }


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


def save_adapted(adapted: "Bundle", original: "Bundle", out: Path | str, *, onnx: bool = True) -> Path:
    """Save a bundle adapted from ``original`` (:meth:`~hematoscope.bundle.Bundle.adapt`) to
    ``out`` and return its path. With ``onnx``, a directory bundle gets its own ONNX export when
    ``original`` had one: the adapted statistics change the network, so the original's file
    would not match it.

    Raises:
        MissingExtraError: the export needs the ``train`` extra (the bundle is saved before).
    """
    from hematoscope.bundle import load_bundle

    saved = adapted.save(out)
    if onnx and getattr(original.config.model, "onnx", None) is not None and Path(out).suffix.lower() != ".zip":
        export_onnx(load_bundle(saved))
    return saved


__all__ = ["DEFAULT_MIN_AGREEMENT", "ExportError", "ExportReport", "FP32_TOLERANCE", "export_onnx", "save_adapted"]

