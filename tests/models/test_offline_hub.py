"""Loading a bundle whose architecture is named on the Hugging Face hub never touches the
network: it loads from the local cache's definition, or fails at once saying what is missing."""
from __future__ import annotations

import json
import shutil
import socket
import time

import numpy as np
import pytest

from hematoscope import load_bundle

HUB_ARCH = "hf-hub:hematoscope-tests/lite0-blood"


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a name or open a connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of our own (the user's is never read)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_arch_bundle(tiny_neural_bundle, tmp_path):
    """The tiny bundle, its config naming the hub architecture (torch weights, no ONNX file)."""
    path = shutil.copytree(tiny_neural_bundle, tmp_path / "hub_bundle")
    (path / "model.onnx").unlink(missing_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["arch"] = HUB_ARCH
    cfg["model"].pop("onnx", None)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_uncached_hub_architecture_fails_fast_without_network(hub_arch_bundle, hub_cache, no_network):
    start = time.monotonic()
    with pytest.raises(ValueError, match="not in the local cache") as err:
        load_bundle(hub_arch_bundle)
    assert time.monotonic() - start < 5
    assert no_network == []
    assert HUB_ARCH in str(err.value) and "model.arch" in str(err.value)


def test_cached_hub_architecture_loads_offline(hub_arch_bundle, tiny_neural_bundle, hub_cache, no_network,
                                               sample_paths):
    repo = hub_cache / "models--hematoscope-tests--lite0-blood"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "efficientnet_lite0", "num_classes": 1000,
                                                      "num_features": 1280}))
    bundle = load_bundle(hub_arch_bundle)
    bundle.use_backend("torch")
    assert no_network == []
    expected = load_bundle(tiny_neural_bundle)
    expected.use_backend("torch")
    np.testing.assert_allclose(bundle.predict(sample_paths).probs, expected.predict(sample_paths).probs,
                               rtol=1e-5, atol=1e-6)


@pytest.fixture
def sample_paths():
    from hematoscope.samples import sample_paths

    return sample_paths()[:3]
