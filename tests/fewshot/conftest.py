"""Fixtures of the few-shot tests: small extractors on tiny images (fast on 2 CPU cores)."""
from __future__ import annotations

import pytest

#: A small timm CNN (about 0.6 M parameters) for tests that need a non-Lite0 architecture.
TINY_ARCH = "mobilenetv3_small_050"


@pytest.fixture(scope="session")
def lite0_extractor():
    """The offline ImageNet Lite0 with mean+std stage pooling, at 32 px."""
    from hematoscope.fewshot.features import load_extractor

    return load_extractor("efficientnet_lite0", size=32, batch_size=16)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A local safetensors state dict of a randomly initialised tiny timm model, and the model."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model(TINY_ARCH, num_classes=0, pretrained=False).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """8 classes x 4 synthetic 32 px images: enough for the command tests, cheap to embed."""
    from hematoscope.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("small"), n_per_class=4, size=32, seed=1)


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    return TINY_ARCH
