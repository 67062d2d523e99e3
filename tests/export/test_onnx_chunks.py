"""OnnxRunner runs large batches in chunks (faster on a small CPU): same outputs, same order."""
from __future__ import annotations

import numpy as np


def test_chunked_runs_give_the_whole_batch_result(tmp_path):
    import torch

    from hematoscope import load_bundle
    from hematoscope.bundle.neural import NeuralBundle
    from hematoscope.bundle.neural_onnx import OnnxRunner
    from hematoscope.export.onnx import export_onnx
    from hematoscope.models.preprocess import Preprocess

    torch.manual_seed(0)
    bundle = NeuralBundle.create(["a", "b", "c"], arch="test_efficientnet", weights=None,
                                 preprocess=Preprocess(size=32))
    path = bundle.save(tmp_path / "bundle")
    export_onnx(load_bundle(path))
    x = np.random.default_rng(0).normal(size=(11, 3, 32, 32)).astype(np.float32)
    whole = OnnxRunner(path / "model.onnx", chunk=64).run(x)
    chunked = OnnxRunner(path / "model.onnx", chunk=3).run(x)
    assert chunked[0].shape == (11, 3) and chunked[1].shape == whole[1].shape
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-5)
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-5)
    np.testing.assert_allclose(OnnxRunner(path / "model.onnx", chunk=3).run(x[:1])[0], whole[0][:1], atol=1e-5)
    empty = OnnxRunner(path / "model.onnx").run(x[:0])
    assert empty[0].shape == (0, 3)
