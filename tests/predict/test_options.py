"""InferenceOptions: one object carries predict's options to the bundle, the Ray actors and job.json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hematoscope.predict.options import InferenceOptions

WHITE = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def test_the_spec_of_default_options_is_what_job_files_held_before():
    # job.json of earlier versions always held these three; a resumed job compares them
    assert InferenceOptions().spec() == {"tta": None, "abstain_below": None, "backend": "auto"}


def test_spec_round_trips_through_json():
    options = InferenceOptions(backend="onnx", tta=2, abstain_below=0.6, classes=WHITE, framing=1.5, recolour=True,
                               ood_accept=0.99)
    spec = json.loads(json.dumps(options.spec()))
    assert spec["classes"] == WHITE and spec["recolour"] is True and "reframe" not in spec
    assert InferenceOptions.from_spec({**spec, "model": "default", "rows": 3}) == options


def test_classes_compare_equal_however_given():
    assert InferenceOptions(classes=WHITE) == InferenceOptions(classes=tuple(WHITE))
    assert InferenceOptions(classes=[]).classes is None


def test_recolour_needs_the_framing_search():
    with pytest.raises(ValueError, match="--no-reframe"):
        InferenceOptions(reframe=False, recolour=True)


def test_apply_sets_each_option_on_the_bundle():
    from hematoscope.bundle.default import load_default_bundle
    from hematoscope.samples import sample_paths

    sample_images = sample_paths()

    plain = load_default_bundle()
    bundle = InferenceOptions(tta=1, abstain_below=0.5, classes=WHITE, recolour=True,
                              ood_accept=0.99).apply(load_default_bundle())
    assert bundle.config.abstain_threshold == 0.5 and bundle.answerable_classes == WHITE
    assert bundle.config.reframe.colours and bundle.config.ood_accept == 0.99
    assert bundle.views_per_image == 1
    pred = bundle.predict(sample_images)
    assert set(pred.predicted) <= set(WHITE)
    # the defaults change nothing
    same = InferenceOptions().apply(load_default_bundle()).predict(sample_images)
    np.testing.assert_allclose(same.probs, plain.predict(sample_images).probs, atol=1e-6)
