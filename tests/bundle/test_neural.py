"""The neural bundle kind: creation, save/load round trips, weights sources, backends."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hematoscope import load_bundle
from hematoscope.bundle import BundleError
from hematoscope.bundle.neural import NeuralBundle, TorchRunner
from hematoscope.models.backbones import offline_lite0_state_dict
from hematoscope.models.preprocess import Preprocess


def _images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8) for i in range(n)]


def test_forward_returns_logits_and_pooled_features(tiny_neural_bundle):
    bundle = load_bundle(tiny_neural_bundle)
    out = bundle.forward(_images())
    assert out.logits.shape == (5, 8)
    assert out.features.shape == (5, 1280)
    assert isinstance(bundle.runner, TorchRunner)
    pred = bundle.predict(_images(3))
    assert len(pred.labels) == 8 and np.allclose(pred.probs.sum(1), 1, atol=1e-5)


def test_dir_and_zip_round_trip_give_identical_outputs(tmp_path):
    torch.manual_seed(1)
    bundle = NeuralBundle.create(["neutrophil", "lymphocyte", "monocyte"], arch="efficientnet_lite0",
                                 preprocess=Preprocess(size=32), weights=None)
    images = _images(4)
    before = bundle.forward(images)
    for target in (tmp_path / "b", tmp_path / "b.zip"):
        bundle.save(target)
        again = load_bundle(target)
        after = again.forward(images)
        np.testing.assert_array_equal(before.logits, after.logits)
        np.testing.assert_array_equal(before.features, after.features)
        assert again.labels == bundle.labels and again.preprocess == bundle.preprocess
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["model"] == {"arch": "efficientnet_lite0", "num_features": 1280, "weights_source": None,
                            "dtype": "float32"}
    assert (tmp_path / "b" / "README.md").read_text().startswith("# untrained")
    # the folder zipped as a whole (`zip -r b.zip b`): its files one level down load too
    import shutil

    shutil.make_archive(str(tmp_path / "whole"), "zip", root_dir=tmp_path, base_dir="b")
    np.testing.assert_array_equal(load_bundle(tmp_path / "whole.zip").forward(images).logits, before.logits)


def test_fp16_weights_are_smaller_and_close(tmp_path):
    torch.manual_seed(2)
    bundle = NeuralBundle.create(["neutrophil", "lymphocyte"], preprocess=Preprocess(size=32), weights=None)
    bundle.save(tmp_path / "f32")
    bundle.config.model.dtype = "float16"
    bundle.save(tmp_path / "f16")
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("f16") < 0.6 * size("f32")
    half = load_bundle(tmp_path / "f16")
    assert next(half.net.parameters()).dtype == torch.float32
    np.testing.assert_allclose(half.forward(_images(2)).logits, bundle.forward(_images(2)).logits, atol=0.05)


@pytest.mark.parametrize("version", [99, 0, "1"])
def test_unreadable_format_version_is_a_clear_error(tiny_neural_bundle, tmp_path, version):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_neural_bundle, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["format_version"] = version
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(copy)


def test_weights_not_matching_architecture_is_a_clear_error(tiny_neural_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_neural_bundle, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["labels"] = cfg["labels"][:3]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(copy)


def _damaged(source, tmp_path, name, change):
    import shutil

    copy = tmp_path / name
    shutil.copytree(source, copy)
    change(copy)
    return copy


def test_damaged_or_foreign_bundle_files_are_clear_errors_naming_the_file(tiny_neural_bundle, tmp_path, monkeypatch):
    """A pickle named .safetensors is refused unread, a cut file or bad JSON is named, a network
    defined outside the bundle (timm's local-dir:) or an absurd input size is refused at load."""
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("a bundle file was unpickled")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    weights = (tiny_neural_bundle / "model.safetensors").read_bytes()

    def config(**change):
        def edit(copy):
            cfg = json.loads((copy / "config.json").read_text())
            for key, value in change.items():
                section, field = key.split("__")
                cfg[section][field] = value
            (copy / "config.json").write_text(json.dumps(cfg))
        return edit

    cases = {
        "pickled": (lambda c: (c / "model.safetensors").write_bytes(pickle.dumps({"w": [1.0] * 10})),
                    "model.safetensors is not a readable safetensors file"),
        "cut": (lambda c: (c / "model.safetensors").write_bytes(weights[:100]),
                "model.safetensors is not a readable safetensors file"),
        "metrics": (lambda c: (c / "metrics.json").write_bytes(b"\x80\x81 not json"), "metrics.json is not valid JSON"),
        "local-dir": (config(model__arch="local-dir:/tmp"), "unknown architecture 'local-dir:/tmp'"),
        "path": (config(model__arch="../../../etc/passwd"), "unknown architecture"),
        "size": (config(preprocess__size=100000), "input size must be 8 to 1024"),
    }
    for name, (change, message) in cases.items():
        copy = _damaged(tiny_neural_bundle, tmp_path, name, change)
        with pytest.raises(BundleError, match=message) as err:
            load_bundle(copy).forward(_images(1))
        assert str(copy) in str(err.value) or name == "size", (name, str(err.value))
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    copy = _damaged(DEFAULT_MODEL_DIR, tmp_path, "ood", lambda c: (c / "ood.safetensors").write_bytes(b""))
    with pytest.raises(BundleError, match="ood.safetensors is not a readable safetensors file"):
        load_bundle(copy)


def test_offline_lite0_weights_load_every_key():
    bundle = NeuralBundle.create(["a_class", "b_class"], weights="imagenet-offline")
    own = bundle.net.model.state_dict()
    ref = offline_lite0_state_dict()
    backbone = [k for k in own if not k.startswith("classifier.")]
    assert len(backbone) == len(ref) - 2  # all but the 1000-class ImageNet classifier weight/bias
    for k in backbone:
        assert torch.equal(own[k], ref[k]), k


def test_local_safetensors_weights_path_loads(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    donor = NeuralBundle.create(["x_class", "y_class"], weights=None)
    state = {k: v.contiguous() for k, v in donor.net.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    bundle = NeuralBundle.create(["x_class", "y_class", "z_class"], weights=tmp_path / "w.safetensors")
    own = bundle.net.model.state_dict()
    for k, v in state.items():
        if not k.startswith("classifier."):
            assert torch.equal(own[k], v), k
    assert bundle.config.model.weights_source == str(tmp_path / "w.safetensors")


def test_backend_choice(tiny_neural_bundle, monkeypatch):
    monkeypatch.setenv("HEMATOSCOPE_BACKEND", "onnx")
    bundle = load_bundle(tiny_neural_bundle)
    assert bundle.backend == "onnx"
    with pytest.raises(BundleError, match="model.onnx"):
        bundle.forward(_images(1))
    bundle.use_backend("torch")
    assert bundle.forward(_images(1)).logits.shape == (1, 8)
    monkeypatch.setenv("HEMATOSCOPE_BACKEND", "tensorrt")
    with pytest.raises(BundleError, match="backend must be one of"):
        load_bundle(tiny_neural_bundle)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050"])
def test_other_timm_architectures(arch, tmp_path):
    bundle = NeuralBundle.create(["neutrophil", "lymphocyte"], arch=arch, preprocess=Preprocess(size=32), weights=None)
    out = bundle.forward(_images(2))
    assert out.logits.shape == (2, 2) and out.features.shape == (2, bundle.config.model.num_features)
    again = load_bundle(bundle.save(tmp_path / "b"))
    np.testing.assert_array_equal(again.forward(_images(2)).logits, out.logits)
