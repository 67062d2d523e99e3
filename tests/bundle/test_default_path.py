"""The default model shipped in the package: present, small, and right on real PBC cells."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope.bundle import default


def test_missing_default_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(default, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(default.DefaultModelMissing, match="--model"):
        default.default_bundle_path()


def test_shipped_model_is_small_and_documented():
    path = default.default_bundle_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 25e6
    bundle = default.load_default_bundle()
    assert bundle.kind == "neural" and bundle.config.model.dtype == "float16"
    assert bundle.config.ood is not None and bundle.config.temperature > 0
    assert bundle.metrics["split"].startswith("test") and bundle.metrics["accuracy"] > 0.95
    card = (path / "README.md").read_text()
    assert "Confusion matrix" in card and "immature_granulocyte" in card


def test_default_model_classifies_the_bundled_real_samples():
    """Real data: the package's PBC sample images (held out from training by bench/train_pbc.py)."""
    from hematoscope.samples import sample_paths
    from hematoscope.taxonomy import TAXONOMY

    paths = sample_paths()
    pred = default.load_default_bundle().predict(paths)
    truth = [TAXONOMY.canonical("pbc", p.parent.name) for p in paths]
    right = [p == t for p, t in zip(pred.predicted, truth)]
    answered = [r for r, a in zip(right, pred.abstain) if not a]
    assert len(paths) >= 16 and not pred.skipped
    # 21 of these 24 right (98.3 % of the 1,396 PBC test cells, bench/train_pbc.py)
    assert sum(right) >= 0.85 * len(paths), list(zip(truth, pred.predicted))
    # the trust layer flags doubtful cells: what it answers is mostly right, and its wrong answers
    # are less confident than its right ones (on the whole test split: 99.0 % right when answered)
    assert len(answered) >= 0.7 * len(paths) and sum(answered) >= 0.9 * len(answered)
    confidence = pred.probs.max(1)
    assert confidence[~np.array(right)].max() < np.median(confidence[np.array(right)])
