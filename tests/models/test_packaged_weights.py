"""Named backbone weights shipped inside the package (the PBC SimCLR Lite0)."""
from __future__ import annotations

import pytest

from hematoscope.models.backbones import (OFFLINE_WEIGHTS, SSL_PBC_WEIGHTS, WeightsError, create_backbone,
                                          packaged_weights_file)


def test_packaged_ssl_weights_load_into_lite0_and_differ_from_imagenet():
    import torch

    ssl = create_backbone("efficientnet_lite0", num_classes=0, weights=SSL_PBC_WEIGHTS).state_dict()
    imagenet = create_backbone("efficientnet_lite0", num_classes=0, weights=OFFLINE_WEIGHTS).state_dict()
    assert ssl.keys() == imagenet.keys()
    assert all(v.dtype == imagenet[k].dtype for k, v in ssl.items())  # fp16 file, fp32 model
    changed = [k for k, v in ssl.items() if v.is_floating_point() and not torch.allclose(v, imagenet[k], atol=1e-3)]
    assert len(changed) > 0.5 * len(ssl)  # SimCLR moved most tensors away from the ImageNet start
    assert packaged_weights_file(SSL_PBC_WEIGHTS).stat().st_size < 8e6


def test_unknown_packaged_name_is_a_clear_error():
    with pytest.raises(WeightsError, match="no packaged weights"):
        packaged_weights_file("hematoscope-nothing")


def test_weights_reference_names_a_local_file_by_name_and_content(tmp_path):
    from hematoscope.models.backbones import weights_reference

    assert weights_reference(None) is None
    for named in (OFFLINE_WEIGHTS, SSL_PBC_WEIGHTS, "https://example.org/w.safetensors", "hf-hub:org/model"):
        assert weights_reference(named) == named
    local = tmp_path / "ssl.safetensors"
    local.write_bytes(b"weights")
    ref = weights_reference(local)
    assert ref.startswith("ssl.safetensors (sha256:") and str(tmp_path) not in ref
