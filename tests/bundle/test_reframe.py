"""The framing search (ReframeRule): cells the default model flags as unlike its training data
are answered from the framing that looks most like it; every other cell is untouched."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.bundle.config import SIZE_PAD_MAX, ReframeRule
from hematoscope.data.images import load_model_image
from hematoscope.models.preprocess import centre_crop, reframe_image


@pytest.fixture(scope="module")
def answers(lisc_files, pbc_subset):
    """The default model's answers with and without the framing search, in its default mode (the
    cascade) and with 1 fixed view (the cascade's fast pass, where the framing is chosen)."""
    files = lisc_files + sorted(pbc_subset.rglob("*.jpg"))[::6]
    bundle = load_bundle("default")
    assert bundle.config.reframe is not None and bundle.reframes and bundle.config.cascade.fast_views == 1
    got, zooms = {}, list(bundle.config.reframe.zooms)
    for views in (None, 1):
        if views:
            bundle.set_tta(views)
        got["on", views] = bundle.predict(files)
        bundle.set_reframe(None)
        got["off", views] = bundle.predict(files)
        bundle.set_reframe(zooms)
    bundle.set_reframe(None)
    return files, got, bundle


def test_only_flagged_cells_are_reframed_and_each_keeps_its_most_familiar_framing(answers):
    files, got, _ = answers
    on1, off1 = got["on", 1], got["off", 1]
    assert off1.framing is None and set(on1.framing.tolist()) <= {1.0, 0.85, 0.75, 0.6}
    whole = on1.framing == 1
    assert not (~whole & ~off1.ood_flag).any(), "a cell that looked like training data was reframed"
    np.testing.assert_array_equal(on1.probs[whole], off1.probs[whole])
    reframed = np.flatnonzero(~whole)
    assert len(reframed) >= 3, "some of the other lab's crops should be answered from a centre crop"
    assert (on1.ood_score[reframed] < off1.ood_score[reframed]).all()
    assert on1.ood_flag.sum() < off1.ood_flag.sum()


def test_the_cascade_searches_framings_of_flagged_cells_with_its_slow_views(answers):
    files, got, bundle = answers
    on, off, flagged_fast = got["on", None], got["off", None], got["off", 1].ood_flag
    slow = load_bundle("default").config.cascade.slow_views
    padded = on.framing > 1  # the default rule's size padding: a crop framed tight, padded to its size
    assert off.framing is None and set(on.framing[~padded].tolist()) <= {1.0, 0.85, 0.75, 0.6}
    assert (on.framing[padded] <= SIZE_PAD_MAX).all()
    assert (on.views[flagged_fast] == slow).all()  # every flagged cell takes the slow path
    familiar = ~flagged_fast & ~off.ood_flag  # flagged neither by the fast pass nor by the slow one
    assert familiar.any() and not (on.framing != 1)[familiar].any()
    np.testing.assert_array_equal(on.probs[familiar], off.probs[familiar])
    reframed = np.flatnonzero(on.framing < 1)[:4]
    assert len(reframed) >= 2
    bundle.config.tta = slow  # fixed slow views, whole crops: what the cascade computed for each framing
    crops = [reframe_image(load_model_image(files[i], bundle.preprocess), float(on.framing[i])) for i in reframed]
    np.testing.assert_allclose(bundle.predict(crops).probs, on.probs[reframed], atol=1e-5)


def test_a_reframed_answer_is_the_answer_for_that_centre_crop(answers):
    files, got, bundle = answers  # bundle: reframing off
    bundle.config.tta = 1
    on = got["on", 1]
    reframed = np.flatnonzero(on.framing < 1)[:4]
    crops = [reframe_image(load_model_image(files[i], bundle.preprocess), float(on.framing[i])) for i in reframed]
    direct = bundle.predict(crops)
    np.testing.assert_allclose(direct.probs, on.probs[reframed], atol=1e-5)
    np.testing.assert_allclose(direct.ood_score, on.ood_score[reframed], atol=1e-4)
    assert (direct.views == 1).all() and (on.views[reframed] == 1).all()


def test_torch_onnx_and_the_server_reframe_alike(lisc_files, tmp_path):
    from fastapi.testclient import TestClient

    from hematoscope.bundle.default import default_bundle_path
    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    files = lisc_files[::3]
    preds = {}
    for backend in ("onnx", "torch"):
        b = load_bundle("default")
        b.use_backend(backend)
        preds[backend] = b.predict(files)
    np.testing.assert_array_equal(preds["onnx"].framing, preds["torch"].framing)
    np.testing.assert_allclose(preds["onnx"].probs, preds["torch"].probs, atol=1e-4)
    assert (preds["onnx"].framing < 1).any()
    app = create_app(Settings(models=[default_bundle_path()], db=tmp_path / "h.sqlite3"))
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post("/api/predict?top_k=8", files=[("files", (f.name, f.read_bytes(), "image/jpeg"))
                                                        for f in files])
    assert r.status_code == 200, r.text
    labels = preds["onnx"].labels
    for item, framing, probs in zip(r.json()["items"], preds["onnx"].framing, preds["onnx"].probs):
        assert item["framing"] == pytest.approx(float(framing))
        for t in item["top_k"]:
            assert abs(t["prob"] - probs[labels.index(t["label"])]) < 1e-4


def test_the_rule_is_validated_saved_and_needs_an_ood_scorer(tiny_neural_bundle, tmp_path):
    for bad in ([], [1.0], [0.1], [4.0], [0.8, 0.8]):
        with pytest.raises(ValidationError):
            ReframeRule(zooms=bad)
    b = load_bundle(tiny_neural_bundle)
    b.set_reframe([0.8, 0.6])
    assert b.config.reframe.zooms == [0.8, 0.6] and not b.reframes  # no OOD scorer: nothing to compare
    again = load_bundle(b.save(tmp_path / "b"))
    assert again.config.reframe.zooms == [0.8, 0.6]
    assert again.predict([np.full((40, 40, 3), 128, np.uint8)]).framing is None


def test_cli_reports_the_framing_and_turns_it_off(lisc_files, tmp_path):
    from hematoscope.cli.main import app

    files = [str(f) for f in lisc_files[::3]]
    on, off = tmp_path / "on.csv", tmp_path / "off.csv"
    r = CliRunner().invoke(app, ["predict", *files, "--out", str(on)])
    assert r.exit_code == 0, r.output
    assert "framing search:" in r.output
    r = CliRunner().invoke(app, ["predict", *files, "--out", str(off), "--no-reframe"])
    assert r.exit_code == 0, r.output
    a, b = pd.read_csv(on), pd.read_csv(off)
    assert (a["framing"] < 1).any() and (b["framing"] == 1).all()  # without the search: the run's own framing
    same = (a["framing"] == 1) & (a["views"] == b["views"])  # flagged cells take more views with the search
    assert same.any()
    np.testing.assert_allclose(a.loc[same, "confidence"], b.loc[same, "confidence"], atol=1e-6)


def test_predict_points_a_run_of_another_labs_crops_to_framing_auto_and_adapt(lisc_files, pbc_subset):
    from hematoscope.cli.main import app

    r = CliRunner().invoke(app, ["predict", *map(str, lisc_files)])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the console wraps long lines
    assert "look unlike the training data and were not answered" in said and "hematoscope adapt default" in said
    assert "--recolour" in said and "--ood-accept 0.99 sets fewer aside" in said
    r = CliRunner().invoke(app, ["predict", *map(str, lisc_files), "--ood-accept", "0.99"])
    assert r.exit_code == 0 and "--ood-accept 0.99 sets" not in r.output  # already moved
    assert "moved to accept 99.0% of the model's validation cells (--ood-accept)" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["predict", *map(str, lisc_files), "--framing", "auto"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "not answered" in said  # a third of LISC's cells stay unfamiliar at any framing
    assert "try --recolour, or adapt" in said and "--framing auto" not in said.split("note:")[1]  # already chosen
    r = CliRunner().invoke(app, ["predict", str(pbc_subset)])
    assert r.exit_code == 0 and "not answered" not in r.output  # the training lab's own cells


def test_trust_fit_sets_and_clears_the_rule(tiny_neural_bundle, synthetic_root, tmp_path):
    from hematoscope.cli.main import app

    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["trust", "fit", str(tiny_neural_bundle), str(synthetic_root), "--out", str(out),
                                 "--reframe-zooms", "0.8,0.6", "--max-train", "50"])
    assert r.exit_code == 0, r.output
    assert load_bundle(out).config.reframe.zooms == [0.8, 0.6] and "framing search" in r.output
    r = CliRunner().invoke(app, ["trust", "fit", str(out), str(synthetic_root), "--reframe-size", "--max-train", "50"])
    assert r.exit_code == 0, r.output
    ref = load_bundle(out).config.reframe.size_ref
    assert ref and "padded to their size" in r.output
    coloured = load_bundle(out)
    coloured.set_recolour([("gamma", 1.4)])
    coloured.save(out)
    r = CliRunner().invoke(app, ["trust", "fit", str(out), str(synthetic_root), "--reframe-zooms", "0.7",
                                 "--max-train", "50"])
    assert r.exit_code == 0, r.output
    assert load_bundle(out).config.reframe.zooms == [0.7] and load_bundle(out).config.reframe.size_ref == ref
    assert load_bundle(out).config.reframe.colours == [("gamma", 1.4)]  # new zooms keep the colour changes
    r = CliRunner().invoke(app, ["trust", "fit", str(out), str(synthetic_root), "--no-reframe-size",
                                 "--max-train", "50"])
    assert r.exit_code == 0, r.output
    assert load_bundle(out).config.reframe.size_ref is None
    r = CliRunner().invoke(app, ["trust", "fit", str(out), str(synthetic_root), "--reframe-zooms", "none",
                                 "--max-train", "50"])
    assert r.exit_code == 0, r.output
    assert load_bundle(out).config.reframe is None
    r = CliRunner().invoke(app, ["trust", "fit", str(out), str(synthetic_root), "--reframe-zooms", "0.8,1"])
    assert r.exit_code == 2 and "zooms" in r.output


def test_cells_cropped_tight_are_answered_from_a_padded_frame_when_it_is_clearly_familiar(pbc_subset):
    """Real PBC cells cut to their centre 40 % (as a lab that crops close around each cell): a
    rule with padded frames (not the shipped one's: docs/crosslab.md) pads some back into a larger
    frame, each only when that brings the OOD score well under the threshold, and they are
    answered better than from the tight crop."""
    from hematoscope.data.readers import read_dataset

    table = read_dataset(pbc_subset)
    bundle = load_bundle("default")
    bundle.set_tta(1)
    bundle.set_reframe([0.85, 0.75, 0.6, 1.5, 2.0, 2.5], out_margin=2.0)
    tight = [centre_crop(load_model_image(p, bundle.preprocess), 0.4) for p in table["path"]]
    truth = np.array(table["canonical"])
    on = bundle.predict(tight)
    bundle.set_reframe(None)
    off = bundle.predict(tight)
    padded = on.framing > 1
    assert padded.sum() >= 5
    threshold = bundle.trust_for(1).ood_threshold
    assert (on.ood_score[padded] < threshold - 2.0).all() and off.ood_flag[padded].all()
    right_on, right_off = (np.array(on.predicted) == truth), (np.array(off.predicted) == truth)
    assert right_on[padded].sum() > right_off[padded].sum() + 3


def test_the_shipped_size_reference_pads_tight_crops_back_and_leaves_whole_crops_alone(pbc_subset):
    """A lab that crops close around each cell (PBC cells cut to their centre 40 %): the shipped
    rule's size reference sees the nucleus filling the frame and tries the crop padded to the size
    the model knows; whole PBC crops never get a padded frame."""
    from hematoscope.data.readers import read_dataset

    table = read_dataset(pbc_subset)
    bundle = load_bundle("default")
    rule = bundle.config.reframe
    assert rule.size_ref is not None and 0.02 < rule.size_ref < 0.15 and not any(z > 1 for z in rule.zooms)
    cells = [load_model_image(p, bundle.preprocess) for p in table["path"]]
    truth = np.array(table["canonical"])
    tight = [centre_crop(c, 0.4) for c in cells]
    on = bundle.predict(tight)
    bundle.config.reframe = rule.model_copy(update={"size_ref": None})
    off = bundle.predict(tight)
    bundle.config.reframe = rule
    padded = on.framing > 1
    assert padded.sum() >= 5 and (on.framing[padded] >= rule.size_gate).all() and (on.framing <= 2.5).all()
    assert (on.ood_score[padded] < off.ood_score[padded]).all()  # the padded frame won on the lowest score
    right_on, right_off = (np.array(on.predicted) == truth), (np.array(off.predicted) == truth)
    assert right_on.sum() > right_off.sum() + 5
    assert (bundle.predict(cells).framing <= 1).all()


def test_the_size_padding_does_not_let_generated_non_cells_through(tmp_path):
    """Text on a dark ground reads as a frame full of stained nucleus, i.e. a very tight crop:
    padded into a big frame it once looked like a cell. Frames stained beyond any cell crop are
    not padded, so non-cells stay flagged as with the whole crop alone."""
    from hematoscope.trust.ood_sets import make_ood_set

    bundle = load_bundle("default")
    bundle.set_tta(1)
    for kind in ("text", "noise", "stripes"):
        files = make_ood_set(kind, tmp_path / kind, n=40, seed=3, size=256)
        pred = bundle.predict(files)
        assert pred.ood_flag.mean() >= 0.95, kind
        assert not (~pred.ood_flag & (pred.framing > 1)).any(), f"a padded {kind} image passed as a cell"


def test_the_size_reference_is_measured_on_enough_stained_images(tiny_neural_bundle, pbc_subset, tmp_path):
    b = load_bundle(tiny_neural_bundle)
    cells = [load_model_image(p, b.preprocess) for p in sorted(pbc_subset.rglob("*.jpg"))]
    with pytest.raises(ValueError, match="at least 50"):
        b.set_reframe([0.8], size_images=cells[:10])
    with pytest.raises(ValueError, match="no stained nuclei"):
        b.set_reframe([0.8], size_images=[np.full((64, 64, 3), 230, np.uint8)] * 60)
    b.set_reframe([0.8], size_images=(cells * 4)[:60])
    ref = b.config.reframe.size_ref
    assert ref == pytest.approx(float(np.median(b.preprocess.stained_share((cells * 4)[:60]))), abs=1e-5)
    assert load_bundle(b.save(tmp_path / "b")).config.reframe.size_ref == ref
    for bad in ({"size_ref": 0.0}, {"size_gate": 1.0}, {"size_gate": 3.0}):
        with pytest.raises(ValidationError):
            ReframeRule(zooms=[0.8], **bad)


def test_predict_framing_auto_chooses_one_framing_for_a_tight_labs_folder(pbc_subset, tmp_path, tiny_neural_bundle):
    from PIL import Image

    from hematoscope.cli.main import app
    from hematoscope.data.images import load_image
    from hematoscope.data.readers import read_dataset

    table = read_dataset(pbc_subset)
    for path, label in zip(table["path"], table["canonical"]):
        (tmp_path / "lab" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(centre_crop(load_image(path), 0.4)).save(tmp_path / "lab" / label / Path(path).name)
    right = {}
    for option in ([], ["--framing", "auto"]):
        out = tmp_path / f"{len(option)}.csv"
        r = CliRunner().invoke(app, ["predict", str(tmp_path / "lab"), "--out", str(out), *option])
        assert r.exit_code == 0, r.output
        rows = pd.read_csv(out)
        right[bool(option)] = (rows["prediction"] == rows["source"].map(lambda s: Path(s).parent.name)).mean()
        if option:
            assert "framing: 2 of each crop's side" in r.output or "framing: 2.5 of each" in r.output, r.output
    assert right[True] > right[False] + 0.15
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "lab"), "--framing", "0.1"])
    assert r.exit_code == 2 and "--framing" in r.output
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "lab"), "--framing", "auto", "-m", str(tiny_neural_bundle)])
    assert r.exit_code == 2 and "no OOD scorer" in r.output


def test_the_colour_search_answers_more_of_another_labs_cells_and_leaves_familiar_ones(lisc_files, pbc_subset,
                                                                                        tmp_path):
    """``--recolour``: cells still flagged after the framings try the rule's colour changes at
    every framing; a cell not flagged keeps its answer, a recoloured one is the answer for that look."""
    from hematoscope.bundle.config import DEFAULT_RECOLOURS
    from hematoscope.models.preprocess import recolour_image

    files = lisc_files + sorted(pbc_subset.rglob("*.jpg"))[::6]
    bundle = load_bundle("default")
    bundle.set_tta(1)
    plain = bundle.predict(files)
    assert plain.recolour is None and plain.records()[0]["recolour"] == ""  # the same keys, no change
    bundle.set_recolour()
    assert [tuple(c) for c in bundle.config.reframe.colours] == list(DEFAULT_RECOLOURS)
    got = bundle.predict(files)
    changed = got.recolour != ""
    assert changed.sum() >= 2 and got.ood_flag.sum() < plain.ood_flag.sum()
    assert plain.ood_flag[changed].all(), "only cells flagged after the framing search try colours"
    assert (got.ood_score[changed] < plain.ood_score[changed]).all()
    kept = ~plain.ood_flag
    np.testing.assert_array_equal(got.probs[kept], plain.probs[kept])
    assert set(got.recolour[changed]) <= {f"{k} {f:g}" for k, f in DEFAULT_RECOLOURS}
    i = int(np.flatnonzero(changed)[0])
    kind, factor = got.recolour[i].split()
    look = reframe_image(recolour_image(load_model_image(files[i], bundle.preprocess), kind, float(factor)),
                         float(got.framing[i]))
    bundle.set_reframe(None)
    np.testing.assert_allclose(bundle.predict([look]).probs[0], got.probs[i], atol=1e-5)
    assert got.records()[i]["recolour"] == got.recolour[i]

    again = load_bundle("default")
    again.set_recolour()
    saved = load_bundle(again.save(tmp_path / "b"))
    assert saved.config.reframe.colours == again.config.reframe.colours
    for bad in ([("saturation", 1.0)], [("gamma", 9.0)], [("gamma", 1.4), ("gamma", 1.4)], [("hue", 1.2)]):
        with pytest.raises(ValidationError):
            ReframeRule(zooms=[0.8], colours=bad)
    bundle.set_reframe(None)
    with pytest.raises(ValueError, match="framing search"):
        bundle.set_recolour()


def test_cli_recolour_writes_its_column_and_refuses_what_it_cannot_do(lisc_files, tmp_path):
    from hematoscope.cli.main import app

    files = [str(f) for f in lisc_files]
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", *files, "--recolour", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "colour search:" in r.output
    table = pd.read_csv(out, keep_default_na=False)
    assert "recolour" in table and (table["recolour"] != "").any()
    r = CliRunner().invoke(app, ["predict", *files[:2], "--recolour", "--no-reframe"])
    assert r.exit_code != 0 and "cannot go with --no-reframe" in r.output


def test_the_server_reports_the_colour_change_of_a_bundle_that_searches_colours(lisc_files, tmp_path):
    from fastapi.testclient import TestClient

    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    bundle = load_bundle("default")
    bundle.set_recolour()
    saved = bundle.save(tmp_path / "coloured")
    files = lisc_files[::2]
    local = load_bundle(saved).predict(files)
    assert (local.recolour != "").any()
    # a bundle saved with colour changes, and the shipped one served with --recolour
    for settings in (Settings(models=[saved], db=tmp_path / "h.sqlite3"),
                     Settings(db=tmp_path / "h2.sqlite3", recolour=True)):
        with TestClient(create_app(settings), base_url="http://localhost") as client:
            r = client.post("/api/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
        assert r.status_code == 200, r.text
        assert [item["recolour"] or "" for item in r.json()["items"]] == list(local.recolour)
    with TestClient(create_app(Settings(db=tmp_path / "h3.sqlite3")), base_url="http://localhost") as client:
        r = client.post("/api/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
    assert not any(item["recolour"] for item in r.json()["items"])  # off unless asked for


def test_evaluate_recolour_scores_the_colour_search(lisc_folder, lisc_files, tmp_path):
    from hematoscope.cli.main import app

    reports = {}
    for extra in ([], ["--recolour"]):
        out = tmp_path / f"r{len(extra)}.json"
        r = CliRunner().invoke(app, ["evaluate", "default", str(lisc_folder), "--json", str(out), "--tta", "1", *extra])
        assert r.exit_code == 0, r.output
        reports[bool(extra)] = pd.read_json(out, typ="series")
    assert reports[True]["n"] == reports[False]["n"] == len(lisc_files)
    assert reports[True]["abstained"] < reports[False]["abstained"]  # the colour search answers more of them
    r = CliRunner().invoke(app, ["evaluate", "default", str(lisc_folder), "--recolour", "--no-reframe"])
    assert r.exit_code != 0 and "cannot go with --no-reframe" in r.output
