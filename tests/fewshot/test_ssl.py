"""Self-supervised pretraining: NT-Xent is right, a tiny run lowers its loss, weights reload."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hematoscope.fewshot.ssl import loss_trend, nt_xent_loss, save_backbone, train_ssl


@pytest.fixture
def one_thread():
    # Two OpenMP threads on a busy 2-core machine can be 50x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_nt_xent_matches_a_direct_computation_and_prefers_matching_views():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    terms = []
    for i in range(12):  # anchor i, partner (i + 6) mod 12, all other views are negatives
        others = [j for j in range(12) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.2 for j in others])
        terms.append(-torch.log_softmax(logits, 0)[others.index((i + 6) % 12)])
    assert torch.allclose(nt_xent_loss(z1, z2, 0.2), torch.stack(terms).mean(), atol=1e-5)
    assert nt_xent_loss(z1, z1 + 0.01 * torch.randn(6, 16)) < nt_xent_loss(z1, z2)


@pytest.mark.parametrize("method", ["simclr", pytest.param("dino", marks=pytest.mark.slow)])
def test_tiny_run_lowers_loss_and_saves_loadable_weights(method, synthetic_root, tiny_arch, tmp_path, one_thread):
    paths = sorted(str(p) for p in synthetic_root.rglob("*.png"))
    res = train_ssl(paths, method=method, arch=tiny_arch, weights=None, size=32, batch_size=12, max_steps=16,
                    minutes=2, lr=1e-3, num_workers=0, progress=False)
    assert res.steps == 16
    first, last = loss_trend(res.losses, window=4)
    assert last < first
    out = save_backbone(res.backbone, tmp_path / "ssl.safetensors", res.meta)
    from hematoscope.fewshot.features import load_extractor

    ext = load_extractor(tiny_arch, weights=out, size=32, pooling="pooled")
    x = np.zeros((1, 40, 40, 3), np.uint8)
    with torch.inference_mode():
        expected = res.backbone(torch.from_numpy(ext.preprocess(list(x)))).numpy()
    np.testing.assert_allclose(ext.embed_arrays(list(x)), expected, rtol=1e-4, atol=1e-5)


def test_unknown_method_is_refused(synthetic_root):
    with pytest.raises(ValueError, match="method"):
        train_ssl(["a.png", "b.png"], method="byol")
