"""The default model's recipe file reproduces the shipped model's training, the training
defaults are that recipe, and docs/train.md names every training option."""
from __future__ import annotations

import json
from pathlib import Path

from hematoscope.bundle.default import DEFAULT_MODEL_DIR
from hematoscope.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_the_recipe_file_gives_every_setting_the_shipped_model_was_trained_with():
    recorded = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["training"]["config"]
    cfg = TrainConfig.from_yaml(REPO / "recipes" / "default-model.yaml", data="split.csv", out="run")
    differ = {k: (getattr(cfg, k), v) for k, v in recorded.items()
              if k not in ("data", "out", "name") and getattr(cfg, k) != v}
    assert not differ
    # the measured best is also what `hematoscope train` does with no options
    plain = TrainConfig(data="split.csv", out="run")
    assert {k: getattr(plain, k) for k in recorded if k not in ("data", "out", "name")} == \
        {k: getattr(cfg, k) for k in recorded if k not in ("data", "out", "name")}


def test_docs_name_every_training_option():
    text = (REPO / "docs" / "train.md").read_text()
    assert [k for k in TrainConfig.model_fields if f"| `{k}` |" not in text] == []
