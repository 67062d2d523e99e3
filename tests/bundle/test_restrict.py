"""Answering among a subset of classes (`Bundle.restrict_classes`, `predict --classes`), on the
shipped model and the real PBC cells bundled with the package."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hematoscope.bundle import BundleError, load_bundle
from hematoscope.cli.main import app
from hematoscope.bundle.default import default_bundle_path
from hematoscope.samples import sample_paths

WHITE = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture(scope="module")
def bundle():
    b = load_bundle(default_bundle_path())
    b.set_tta(1)
    return b


def test_restricted_probabilities_are_the_renormalised_subset(bundle):
    paths = [str(p) for p in sample_paths()]
    full = bundle.predict(paths)
    bundle.restrict_classes(WHITE)
    try:
        part = bundle.predict(paths)
    finally:
        bundle.restrict_classes(None)
    keep = np.array([c in WHITE for c in bundle.labels])
    assert part.labels == full.labels
    np.testing.assert_allclose(part.probs.sum(1), 1.0, atol=1e-6)
    assert np.all(part.probs[:, ~keep] == 0)
    expected = full.probs[:, keep] / full.probs[:, keep].sum(1, keepdims=True)
    np.testing.assert_allclose(part.probs[:, keep], expected, rtol=1e-5, atol=1e-7)
    assert {bundle.labels[i] for i in part.probs.argmax(1)} <= set(WHITE)
    # "unlike training data" does not depend on which answers are allowed
    np.testing.assert_array_equal(part.ood_flag, full.ood_flag)
    # platelets / erythroblasts / IGs were answered as such before, and now cannot be
    others = [i for i, p in enumerate(paths) if "/platelet/" in p or "/erythroblast/" in p]
    assert any(full.labels[full.probs[i].argmax()] not in WHITE for i in others)
    assert bundle.answerable_classes == bundle.labels


def test_calibrated_probs_follow_the_restriction_too(bundle):
    """Explainers (LIME) and other callers of calibrated_probs see the answers predict gives."""
    from hematoscope.data.images import load_image

    images = [load_image(p) for p in sample_paths()[:6]]
    logits = bundle.forward(images).logits
    bundle.restrict_classes(WHITE)
    try:
        probs = bundle.calibrated_probs(logits)
        decided = bundle.predict_arrays(images, [str(i) for i in range(6)]).probs
    finally:
        bundle.restrict_classes(None)
    keep = np.array([c in WHITE for c in bundle.labels])
    assert np.all(probs[:, ~keep] == 0) and not np.all(bundle.calibrated_probs(logits)[:, ~keep] == 0)
    np.testing.assert_allclose(probs, decided, rtol=1e-5, atol=1e-7)


def test_bad_class_lists_are_refused(bundle):
    with pytest.raises(BundleError, match="not classes of .*: blast; its classes are"):
        bundle.restrict_classes(["neutrophil", "blast"])
    with pytest.raises(BundleError, match="at least 2"):
        bundle.restrict_classes(["neutrophil"])
    assert bundle._answerable is None


def test_predict_cli_classes(tmp_path):
    out = tmp_path / "out.json"
    folder = sample_paths()[0].parents[1]
    res = CliRunner().invoke(app, ["predict", str(folder / "platelet"), str(folder / "lymphocyte"), "--tta", "1",
                                   "--classes", ",".join(WHITE), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "answers restricted to: " + ", ".join(c for c in load_bundle(default_bundle_path()).labels
                                                 if c in WHITE) in res.output
    rows = json.loads(out.read_text())
    rows = rows["predictions"]
    assert len(rows) == 6 and all(r["top1"] in WHITE for r in rows)
    two = tmp_path / "two.csv"  # top 3 of 2 classes: no third, not a class the answer cannot name at 0
    res = CliRunner().invoke(app, ["predict", str(folder / "lymphocyte"), "--tta", "1", "--classes",
                                   "lymphocyte,monocyte", "--out", str(two)])
    assert res.exit_code == 0, res.output
    import csv

    said = " ".join(res.output.split())
    assert "Lymphocyte" in said and "Platelet" not in said  # the table lists the classes answers could name
    rows = list(csv.DictReader(two.open()))
    assert {r["top3"] for r in rows} == {""} and all({r["top1"], r["top2"]} <= {"lymphocyte", "monocyte"}
                                                      for r in rows)
    bad = CliRunner().invoke(app, ["predict", str(folder / "platelet"), "--classes", "neutrophil,blast"])
    assert bad.exit_code != 0 and "blast" in bad.output


def test_classes_are_named_as_in_a_labs_folders(bundle):
    """Plurals, capitals and the taxonomy's synonyms name the bundle's classes, as folder labels do."""
    assert bundle.class_subset(["Neutrophils", "LYMPHOCYTE", "lymphocyte "]) == ["neutrophil", "lymphocyte"]
    with pytest.raises(BundleError, match="banana"):
        bundle.class_subset(["neutrophil", "banana"])


def test_ray_actors_load_the_same_restriction():
    from hematoscope.predict.distributed import InferenceOptions, load_for_inference

    b = load_for_inference(None, InferenceOptions(tta=1, classes=WHITE))
    assert b.answerable_classes == [c for c in b.labels if c in WHITE]
    assert b.describe()["answerable_classes"] == b.answerable_classes

