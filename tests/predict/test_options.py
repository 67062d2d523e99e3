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
    assert bundle.trust_for(1).abstain_threshold == 0.5 and bundle.answerable_classes == WHITE
    assert bundle.config.reframe.colours and bundle.config.ood_accept == 0.99
    assert bundle.views_per_image == 1
    pred = bundle.predict(sample_images)
    assert set(pred.predicted) <= set(WHITE)
    # the defaults change nothing
    same = InferenceOptions().apply(load_default_bundle()).predict(sample_images)
    np.testing.assert_allclose(same.probs, plain.predict(sample_images).probs, atol=1e-6)


def test_abstain_below_moves_the_cut_alone_and_keeps_the_cascade(caplog):
    """`--abstain-below 0.9` wrote the bundle-wide threshold, which made the fitted per-view trust
    and the cascade look stale: 1 fixed view with a warning about a refit that never happened, and
    a stricter cut that set aside fewer cells. Now only the cut moves."""
    import logging

    from hematoscope.bundle.default import load_default_bundle
    from hematoscope.samples import sample_paths

    plain = load_default_bundle()
    a = plain.predict(sample_paths())
    cut = float(np.sort(a.probs.max(1)[~a.abstain])[1]) + 1e-6  # above the two least sure answers
    strict = InferenceOptions(abstain_below=cut).apply(load_default_bundle())
    assert plain.uses_cascade and strict.uses_cascade and strict.view_mode == plain.view_mode
    with caplog.at_level(logging.WARNING):
        b = strict.predict(sample_paths())
    assert "no longer current" not in caplog.text and "before the bundle-wide trust" not in caplog.text
    np.testing.assert_array_equal(a.views, b.views)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)  # the same answers, only the cut differs
    assert (b.abstain >= a.abstain).all() and b.abstain.sum() > a.abstain.sum()
    for views in (1, 2, 8):
        assert strict.trust_for(views).abstain_threshold == cut
        assert strict.trust_for(views).ood_threshold == plain.trust_for(views).ood_threshold
