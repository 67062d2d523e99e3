"""ONNX export: parity with PyTorch, backend selection, int8 refusal, the export command."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.bundle import BundleError
from hematoscope.bundle.neural import NeuralBundle, TorchRunner
from hematoscope.cli.main import app
from hematoscope.data.images import load_image
from hematoscope.bundle.neural_onnx import OnnxRunner
from hematoscope.export.onnx import FP32_TOLERANCE, ExportError, export_onnx
from hematoscope.models.preprocess import Preprocess
from hematoscope.samples import sample_paths


@pytest.fixture(scope="module")
def exported(tiny_neural_bundle, tmp_path_factory):
    """The tiny Lite0 bundle, exported once into a copy (the session fixture stays untouched)."""
    out = tmp_path_factory.mktemp("exported") / "bundle"
    report = export_onnx(load_bundle(tiny_neural_bundle), out)
    return out, report


@pytest.fixture(scope="module")
def micro_bundle(tmp_path_factory):
    """A saved bundle of timm's 0.1 M-parameter test_efficientnet: fast to export and quantise."""
    import torch

    torch.manual_seed(0)
    bundle = NeuralBundle.create(["lymphocyte", "monocyte", "neutrophil"], arch="test_efficientnet", weights=None,
                                 preprocess=Preprocess(size=32))
    return bundle.save(tmp_path_factory.mktemp("micro") / "bundle")


def test_export_writes_a_checked_dynamic_batch_model(exported, tiny_neural_bundle):
    out, report = exported
    assert (out / "model.onnx").is_file() and (out / "model.safetensors").is_file()
    assert not (tiny_neural_bundle / "model.onnx").exists()
    assert report.precision == "float32" and report.opset == 17
    assert report.parity_images == len(sample_paths()) == 24 and "PBC" in report.parity_source
    assert 0 <= report.max_prob_diff < FP32_TOLERANCE
    recorded = json.loads((out / "config.json").read_text())["model"]["onnx"]
    assert recorded["file"] == "model.onnx" and recorded["opset"] == 17
    assert recorded["parity"]["max_prob_diff"] == report.max_prob_diff
    runner = OnnxRunner(out / "model.onnx", threads=1)
    for n in (1, 3):
        logits, features = runner.run(np.zeros((n, 3, 64, 64), np.float32))
        assert logits.shape == (n, 8) and features.shape == (n, 1280)


def test_backend_selection(exported, tiny_neural_bundle):
    out, _ = exported
    assert isinstance(load_bundle(out).runner, OnnxRunner)  # auto: model.onnx is there
    assert isinstance(load_bundle(tiny_neural_bundle).runner, TorchRunner)  # auto: it is not
    forced = load_bundle(out)
    forced.use_backend("torch")
    assert isinstance(forced.runner, TorchRunner)
    with pytest.raises(BundleError, match="export"):  # the backend is checked when chosen
        load_bundle(tiny_neural_bundle).use_backend("onnx")


def test_backends_agree_on_the_bundled_sample_images(exported):
    out, _ = exported
    onnx_bundle, torch_bundle = load_bundle(out), load_bundle(out)
    torch_bundle.use_backend("torch")
    paths = sample_paths()
    a, b = onnx_bundle.predict(paths), torch_bundle.predict(paths)
    assert len(a) == len(paths) == 24
    assert a.predicted == b.predicted
    assert np.abs(a.probs - b.probs).max() < FP32_TOLERANCE
    features_onnx = onnx_bundle.forward([load_image(paths[0])]).features
    features_torch = torch_bundle.forward([load_image(paths[0])]).features
    np.testing.assert_allclose(features_onnx, features_torch, atol=1e-4)  # OOD scoring sees the same


def test_int8_is_refused_below_the_agreement_threshold(micro_bundle, tmp_path):
    out = tmp_path / "int8"
    with pytest.raises(ExportError, match="agrees with float32 on only .*required 101.00%.*nothing was written"):
        export_onnx(load_bundle(micro_bundle), out, quantize="int8", min_agreement=1.01)
    assert not out.exists()
    assert not (micro_bundle / "model.onnx").exists()


def test_bad_arguments_are_refused(micro_bundle, tmp_path):
    bundle = load_bundle(micro_bundle)
    with pytest.raises(ExportError, match="quantize"):
        export_onnx(bundle, tmp_path / "x", quantize="int4")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(bundle, tmp_path / "x", opset=11)
    bundle.save(tmp_path / "b.zip")
    with pytest.raises(ExportError, match="--out"):
        export_onnx(load_bundle(tmp_path / "b.zip"))
    with pytest.raises(ExportError, match="written to a directory, not z.zip"):
        export_onnx(load_bundle(tmp_path / "b.zip"), tmp_path / "z.zip")
    assert not (tmp_path / "z.zip").exists()  # refused before anything was written


def test_export_command_then_predict_with_either_backend(micro_bundle, tmp_path):
    runner = CliRunner()
    out = tmp_path / "exported"
    res = runner.invoke(app, ["export", str(micro_bundle), "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "float32 / 17" in res.output and (out / "model.onnx").is_file()
    sample_dir = str(sample_paths()[0].parent)
    csvs = {}
    for backend in ("onnx", "torch"):
        csvs[backend] = tmp_path / f"{backend}.csv"
        res = runner.invoke(app, ["predict", "--model", str(out), "--backend", backend, sample_dir,
                                  "--out", str(csvs[backend])])
        assert res.exit_code == 0, res.output
    import pandas as pd

    a, b = pd.read_csv(csvs["onnx"]), pd.read_csv(csvs["torch"])
    assert len(a) == 3 and list(a["prediction"]) == list(b["prediction"])
    res = runner.invoke(app, ["export", str(micro_bundle), "--format", "tflite"])
    assert res.exit_code == 2 and "onnx" in res.output


def test_export_never_replaces_a_bundle_unasked_nor_writes_into_the_package(micro_bundle, tmp_path):
    runner = CliRunner()
    taken = tmp_path / "taken"
    load_bundle(micro_bundle).save(taken)
    before = {p.name: p.read_bytes() for p in taken.iterdir()}
    res = runner.invoke(app, ["export", str(micro_bundle), "--out", str(taken)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in taken.iterdir()} == before
    res = runner.invoke(app, ["export", str(micro_bundle), "--out", str(taken), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (taken / "model.onnx").is_file()

    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    shipped = {p.name: p.stat().st_mtime_ns for p in DEFAULT_MODEL_DIR.iterdir()}
    with pytest.raises(ExportError, match="installed package.*--out"):
        export_onnx(load_bundle("default"))
    assert {p.name: p.stat().st_mtime_ns for p in DEFAULT_MODEL_DIR.iterdir()} == shipped


@pytest.mark.slow
def test_int8_export_on_validation_data(micro_bundle, tmp_path, pbc_subset):
    report = export_onnx(load_bundle(micro_bundle), tmp_path / "int8", quantize="int8", validation=pbc_subset,
                         min_agreement=0.0)
    assert report.precision == "int8" and report.agreement_images == 48
    assert report.accuracy["n"] == 18  # lymphocyte, monocyte, neutrophil rows of the subset
    bundle = load_bundle(tmp_path / "int8")
    assert isinstance(bundle.runner, OnnxRunner)
    onnx = json.loads((tmp_path / "int8" / "config.json").read_text())["model"]["onnx"]
    assert onnx["precision"] == "int8"
    # the int8 file's own distance from PyTorch is recorded, not only the float32 check's
    assert onnx["parity"]["int8_max_prob_diff"] == report.int8_max_prob_diff > onnx["parity"]["max_prob_diff"]
    assert len(bundle.predict(sample_paths()[:4])) == 4


def test_onnx_inference_never_imports_torch(exported):
    """Start-up time: a bundle served by ONNX Runtime must not pay for importing torch."""
    import subprocess
    import sys

    out, _ = exported
    code = ("import sys\nfrom hematoscope import load_bundle\nfrom hematoscope.predict import predict_paths\n"
            "pred = predict_paths(load_bundle(sys.argv[1]), [sys.argv[2]])\n"
            "assert len(pred) == 3, pred\nprint('torch' in sys.modules, 'timm' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(out), str(sample_paths()[0].parent)],
                         capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]
