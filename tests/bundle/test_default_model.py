"""The shipped default model answers the bundled samples exactly as it did before the bundle
refactor (issue 16): the reference in data/default_model_samples.csv was computed with the code
of that time, per backend, in the bundle's default view mode (the adaptive cascade)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hematoscope import load_bundle
from hematoscope.samples import sample_paths, samples_dir

REFERENCE = Path(__file__).parent / "data" / "default_model_samples.csv"


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_default_model_predictions_on_bundled_samples_are_unchanged(backend):
    ref = pd.read_csv(REFERENCE)
    ref = ref[ref["backend"] == backend].set_index("sample")
    bundle = load_bundle("default")
    bundle.use_backend(backend)
    paths = sample_paths()
    assert sorted(p.relative_to(samples_dir()).as_posix() for p in paths) == sorted(ref.index)
    pred = bundle.predict(paths)
    names = [p.relative_to(samples_dir()).as_posix() for p in paths]
    ref = ref.loc[names]
    assert [bundle.labels[i] for i in pred.probs.argmax(1)] == list(ref["top1"])
    np.testing.assert_allclose(pred.probs, ref[bundle.labels].to_numpy(), atol=1e-4)
    np.testing.assert_allclose(pred.ood_score, ref["ood_score"].to_numpy(), atol=1e-4)
    assert list(pred.abstain.astype(int)) == list(ref["abstain"])
    assert list(pred.views) == list(ref["views"])
