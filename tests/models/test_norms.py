"""Backbones built with other normalisation layers (TrainConfig.norm / config.model.norm)."""
from __future__ import annotations

import pytest
import torch

from hematoscope.models.backbones import WeightsError, create_backbone


def _norm_types(module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if "Norm" in type(m).__name__}


def test_group_early_converts_the_stem_and_first_three_stages_and_keeps_their_scales():
    torch.manual_seed(0)
    plain = create_backbone("test_efficientnet", weights=None)
    for p in plain.parameters():  # non-trivial scales and shifts to carry over
        p.data.uniform_(0.5, 1.5)
    early = create_backbone("test_efficientnet", weights=None, norm="group_early")
    early.load_state_dict(plain.state_dict(), strict=False)
    assert _norm_types(early.bn1) == {"GroupNormAct"}
    blocks = list(early.blocks)
    assert all(_norm_types(stage) == {"GroupNormAct"} for stage in blocks[:3])
    assert len(blocks) > 3 and all(_norm_types(stage) == {"BatchNormAct2d"} for stage in blocks[3:])
    assert torch.equal(early.bn1.weight, plain.bn1.weight)
    early.eval()
    assert early(torch.randn(2, 3, 32, 32)).shape == plain.eval()(torch.randn(2, 3, 32, 32)).shape


def test_unknown_norm_is_a_clear_error():
    with pytest.raises(WeightsError, match="unknown norm 'layer'"):
        create_backbone("test_efficientnet", weights=None, norm="layer")
