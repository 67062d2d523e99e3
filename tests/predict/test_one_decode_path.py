"""One decode path: the same JPEG gets the same answer from the CLI, Bundle.predict, `evaluate`,
the server, `trust fit`'s outputs and (classical) the training features, for a neural bundle with
a cascade and for a classical bundle."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.cli.main import app
from hematoscope.data.images import load_model_image
from hematoscope.samples import sample_paths
from hematoscope.trust.fit import bundle_view_outputs
from hematoscope.trust.views import fit_view_trust, view_outputs


@pytest.fixture(scope="module")
def neural_with_cascade(tiny_neural_bundle, tmp_path_factory):
    """The tiny neural bundle with per-view trust and a cascade fitted on the bundled samples."""
    bundle = load_bundle(tiny_neural_bundle)
    paths = sample_paths()
    images = [load_model_image(p, bundle.preprocess) for p in paths]
    y = np.array([bundle.labels.index(p.parent.name) if p.parent.name in bundle.labels else 0 for p in paths])
    vo = view_outputs(bundle, images)
    fit_view_trust(bundle, train=(vo.take(np.arange(0, 24, 2)), y[::2]), val=(vo.take(np.arange(1, 24, 2)), y[1::2]))
    return bundle.save(tmp_path_factory.mktemp("cascade") / "bundle")


@pytest.fixture(params=["neural", "classical"])
def bundle_path(request, neural_with_cascade, tiny_classical_bundle):
    return neural_with_cascade if request.param == "neural" else tiny_classical_bundle


def _one_file(tmp_path):
    """A real PBC JPEG (360 x 363) in a class folder, so that evaluate can read it as a dataset."""
    src = sample_paths()[0]
    folder = tmp_path / "data" / src.parent.name
    folder.mkdir(parents=True)
    return shutil.copy(src, folder / src.name), tmp_path / "data"


def _served_answer(bundle_path, path, db):
    from fastapi.testclient import TestClient

    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    with TestClient(create_app(Settings(models=[bundle_path], db=db)), base_url="http://localhost") as client:
        served = client.post("/api/predict", files=[("files", (path.name, path.read_bytes(), "image/jpeg"))])
    assert served.status_code == 200, served.text
    return served.json()["items"][0]


def test_one_file_gets_one_answer_everywhere(bundle_path, tmp_path):
    path, data_dir = _one_file(tmp_path)
    bundle = load_bundle(bundle_path)
    runner = CliRunner()

    # 1. the CLI (threaded pipeline)
    out = tmp_path / "cli.json"
    r = runner.invoke(app, ["predict", str(path), "--model", str(bundle_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    cli = json.loads(out.read_text())["predictions"][0]

    # 2. the Python API
    api = bundle.predict([path])
    # 3. evaluate
    rep = tmp_path / "eval.json"
    r = runner.invoke(app, ["evaluate", str(bundle_path), str(data_dir), "--json", str(rep)])
    assert r.exit_code == 0, r.output
    ev = json.loads(rep.read_text())["predictions"][0]
    # 4. the server
    srv = _served_answer(bundle_path, path, tmp_path / "history.sqlite3")
    # 5. trust fit's outputs, with the trust of the views this file was answered with
    views = int(api.views[0])
    vo, kept = bundle_view_outputs(bundle, [str(path)], views=views)
    fit = bundle.decide(vo.averaged(views), [str(path)], views=views)

    answers = {"cli": cli, "evaluate": ev, "server": srv}
    for name, a in answers.items():
        assert a["prediction"] == api.predicted[0], name
        assert a["confidence"] == pytest.approx(float(api.confidence[0]), abs=2e-6), name
        assert a["ood_score"] == pytest.approx(float(api.ood_score[0]), abs=2e-5), name
        assert a.get("views", views) == views, name
    np.testing.assert_allclose(fit.probs, api.probs, atol=1e-6)
    np.testing.assert_allclose(fit.ood_score, api.ood_score, atol=1e-5)

    # the decoding matters: where the bundle draft-decodes (neural), a full decode of the same
    # file gives another answer, so the agreement above is the one decode path at work, not an
    # insensitive model; a classical bundle decodes at full size, as an array given to it is
    full = bundle.predict_arrays([load_model_image(path, bundle.preprocess, draft=False)], ["full"])
    same = np.allclose(full.ood_score, api.ood_score, atol=1e-5) and np.allclose(full.probs, api.probs, atol=1e-6)
    assert same == (not bundle.preprocess.jpeg_draft)


def test_classical_training_features_equal_prediction_features(tiny_classical_bundle):
    """The classical training path (ClassicalFeatures on files) computes exactly the features the
    bundle computes when predicting the same files."""
    from hematoscope.bundle.base import ModelOutput
    from hematoscope.classical.features import ClassicalFeatures

    bundle = load_bundle(tiny_classical_bundle)
    paths = sample_paths()[:4]
    at_training = ClassicalFeatures(n_jobs=1, cache=False).transform([str(p) for p in paths])
    at_prediction = bundle.features([load_model_image(p, bundle.preprocess) for p in paths])
    np.testing.assert_array_equal(at_training, at_prediction)
    np.testing.assert_allclose(bundle.predict(paths).probs,
                               bundle.decide(ModelOutput(bundle.logits_of(at_training), at_training),
                                             [str(p) for p in paths]).probs, atol=1e-7)
