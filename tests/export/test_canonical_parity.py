"""A bundle's colour canonicalisation is part of its Preprocess: torch, ONNX Runtime, the server and
the training evaluation path give one image the same probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope import load_bundle
from hematoscope.data.images import load_image
from hematoscope.models.preprocess import Preprocess
from hematoscope.samples import sample_paths

LABELS = ["lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture(scope="module")
def canonical_bundle(tmp_path_factory):
    """A micro bundle whose preprocessing canonicalises colour, exported to ONNX."""
    import torch

    from hematoscope.bundle.neural import NeuralBundle
    from hematoscope.export.onnx import export_onnx

    torch.manual_seed(0)
    pre = Preprocess(size=48, resize="shorter_crop", crop_pct=48 / 54, colour="percentile",
                     colour_ref=[0.3, 0.1, 0.45, 0.97, 0.9, 0.82])
    bundle = NeuralBundle.create(LABELS, arch="test_efficientnet", weights=None, preprocess=pre)
    path = bundle.save(tmp_path_factory.mktemp("canon") / "bundle")
    export_onnx(load_bundle(path))
    return path


def test_torch_onnx_server_and_training_eval_agree(canonical_bundle, tmp_path):
    from fastapi.testclient import TestClient

    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    files = sample_paths()[:4]
    torch_b, onnx_b = load_bundle(canonical_bundle), load_bundle(canonical_bundle)
    torch_b.use_backend("torch")
    onnx_b.use_backend("onnx")
    assert torch_b.preprocess.colour == "percentile"
    p_torch = torch_b.predict(files).probs
    p_onnx = onnx_b.predict(files).probs
    np.testing.assert_allclose(p_torch, p_onnx, atol=1e-4)

    app = create_app(Settings(models=[canonical_bundle], db=tmp_path / "h.sqlite3"))
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post("/api/predict?top_k=3", files=[("files", (f.name, f.read_bytes(), "image/jpeg"))
                                                        for f in files])
        assert r.status_code == 200, r.text
        for item, probs in zip(r.json()["items"], p_onnx):
            served = {t["label"]: t["prob"] for t in item["top_k"]}
            for label, prob in served.items():
                assert abs(prob - probs[LABELS.index(label)]) < 1e-4


def test_training_evaluation_decodes_like_every_other_path(canonical_bundle):
    """The training run's evaluation items (decode_all -> EvalImages) give Bundle.predict's
    probabilities: the sample JPEGs are 4x the model's decode size, so a decoding that differs
    (full vs DCT-scaled) shows here."""
    from hematoscope.train.data import EvalImages, decode_all

    files = sample_paths()[:4]
    b = load_bundle(canonical_bundle)
    b.use_backend("torch")
    resized, kept, _ = decode_all([str(f) for f in files], b.preprocess, description="eval")
    items = EvalImages(resized, [str(f) for f in files], np.zeros(len(files), int), b.preprocess)
    x = np.stack([items[i][0].numpy() for i in range(len(files))])
    np.testing.assert_allclose(b.calibrated_probs(b.forward_tensor(x).logits), b.predict(files).probs, atol=1e-4)


def test_canonicalisation_changes_what_the_model_sees(canonical_bundle):
    b = load_bundle(canonical_bundle)
    img = load_image(sample_paths()[0])
    tinted = np.clip(img.astype(np.float32) * [0.75, 0.85, 1.1], 0, 255).astype(np.uint8)
    plain = Preprocess(**{**b.preprocess.to_dict(), "colour": "none", "colour_ref": None})
    # with canonicalisation the tinted and the original cell give nearly the same input
    d_canon = np.abs(b.preprocess([tinted]) - b.preprocess([img])).mean()
    d_plain = np.abs(plain([tinted]) - plain([img])).mean()
    assert d_canon < 0.3 * d_plain
