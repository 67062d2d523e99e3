"""Adapting a served model to a lab's crops from the web app (POST /api/models/adapt)."""
from __future__ import annotations

import json

import pytest

from hematoscope import load_bundle


def _files(paths, *extra):
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths] + list(extra)


@pytest.fixture(scope="module")
def lab_crops(lisc_root):
    """60 crops of another lab (LISC, Tehran), spread over its classes."""
    return sorted(lisc_root.rglob("*.jpg"))[::20][:60]


def test_a_model_adapted_from_the_web_app_is_served_and_kept(make_client, lab_crops, lisc_root, tmp_path):
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    adapt_dir = tmp_path / "adapted"
    client = make_client(models=[DEFAULT_MODEL_DIR], adapt_dir=adapt_dir)
    assert client.get("/api/models").json()["can_adapt"] is True
    broken = ("files", ("broken.jpg", b"not an image", "image/jpeg"))
    r = client.post("/api/models/adapt", files=_files(lab_crops, broken),
                    data={"name": "lisc-lab", "source": "LISC, Tehran"})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["model"]["name"] == "lisc-lab" and "LISC, Tehran" in result["model"]["adapted_to"]
    assert result["images"] == len(lab_crops) and len(result["skipped"]) == 1 and "broken.jpg" in result["skipped"][0]
    assert result["class_mix"] is None  # not tuned
    assert (adapt_dir / "lisc-lab" / "config.json").is_file() and (adapt_dir / "lisc-lab" / "model.onnx").is_file()
    # it answers now, next to the model it came from, which is unchanged
    listed = {m["name"]: m for m in client.get("/api/models").json()["data"]}
    assert list(listed) == ["hematoscope-pbc-lite0-ssl-e24", "lisc-lab"] and listed["lisc-lab"]["default"] is False
    assert listed["hematoscope-pbc-lite0-ssl-e24"]["adapted_to"] is None
    cells = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in sorted(lisc_root.rglob("*.jpg"))[1::97][:5]]
    analysis = client.post("/api/predict?model=lisc-lab", files=cells).json()
    assert analysis["model"]["name"] == "lisc-lab" and len(analysis["items"]) == 5
    adapted_on = load_bundle(adapt_dir / "lisc-lab").config.adaptation["date"]
    assert analysis["model"]["version"].endswith(f", adapted {adapted_on}")  # told apart from the original's
    # the name is taken now; a restarted server serves the adapted model again
    again = client.post("/api/models/adapt", files=_files(lab_crops), data={"name": "lisc-lab"})
    assert again.status_code == 409 and "exists" in again.json()["detail"]
    restarted = make_client(models=[DEFAULT_MODEL_DIR], adapt_dir=adapt_dir, db=tmp_path / "other.sqlite3")
    names = {m["name"]: m["id"] for m in restarted.get("/api/models").json()["data"]}
    assert names["lisc-lab"] == listed["lisc-lab"]["id"]

    # removed from the web app: no longer served, its folder gone, its analyses kept
    assert [m["removable"] for m in listed.values()] == [False, True]
    refused = client.delete("/api/models/hematoscope-pbc-lite0-ssl-e24")  # the operator's model stays
    assert refused.status_code == 403 and "--model" in refused.json()["detail"]
    assert client.delete("/api/models/no-such-model").status_code == 404
    assert client.delete("/api/models/lisc-lab").status_code == 204
    assert [m["name"] for m in client.get("/api/models").json()["data"]] == ["hematoscope-pbc-lite0-ssl-e24"]
    assert list(adapt_dir.iterdir()) == []
    assert client.post("/api/predict?model=lisc-lab", files=cells).status_code == 404
    assert client.get(f"/api/analyses/{analysis['id']}").json()["model"]["name"] == "lisc-lab"


def test_tuning_from_the_web_app_answers_among_the_lab_classes(make_client, lab_crops, tmp_path):
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    white = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    client = make_client(models=[DEFAULT_MODEL_DIR], adapt_dir=tmp_path / "adapted")
    r = client.post("/api/models/adapt", files=_files(lab_crops),
                    data={"name": "lisc-tuned", "tune": "true", "classes": ",".join(white)})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["answerable_classes"] == white
    mix = r.json()["class_mix"]  # what tuning held the crops' mean answer to, estimated from them
    assert list(mix) == white and sum(mix.values()) == pytest.approx(1.0, abs=1e-3)
    config = json.loads((tmp_path / "adapted" / "lisc-tuned" / "config.json").read_text())
    assert config["adaptation"]["tuning"]["epochs"] == 8  # the tuning the CLI's adapt --tune does
    assert config["adaptation"]["tuning"]["class_mix"] == mix


def test_adapting_is_off_unless_the_server_is_given_a_folder(client, sample_files):
    assert client.get("/api/models").json()["can_adapt"] is False
    r = client.post("/api/models/adapt", files=_files(sample_files), data={"name": "x"})
    assert r.status_code == 403 and "--adapt-dir" in r.json()["detail"]


@pytest.mark.parametrize("form, status, says", [
    ({"name": "../up"}, 422, "letters, digits"),
    ({"name": "ok", "tune": "true"}, 422, "needs the classes"),
    ({"name": "ok", "source": "a\nb"}, 422, "control characters"),
    ({"name": "ok"}, 422, "at least 50"),  # three sample cells
    ({"name": "ok", "base": "nope"}, 404, "no model named"),
])
def test_bad_adaptation_requests_are_refused_and_save_nothing(make_client, sample_files, tmp_path, form, status, says):
    adapt_dir = tmp_path / "adapted"
    client = make_client(adapt_dir=adapt_dir)
    r = client.post("/api/models/adapt", files=_files(sample_files), data=form)
    assert r.status_code == status and says in r.json()["detail"]
    assert not adapt_dir.exists() or not any(adapt_dir.iterdir())
    assert len(client.get("/api/models").json()["data"]) == 1


def test_one_adaptation_at_a_time(make_client, sample_files, tmp_path):
    client = make_client(adapt_dir=tmp_path / "adapted")
    with client.app.state.adapting:  # as while another request adapts
        r = client.post("/api/models/adapt", files=_files(sample_files), data={"name": "second"})
    assert r.status_code == 409 and "another adaptation" in r.json()["detail"]


def test_an_adaptation_folder_that_cannot_be_written_stops_the_server_at_once(tiny_neural_bundle, tmp_path):
    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings
    from hematoscope.serve.deps import ServeError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ServeError, match="--adapt-dir"):
        create_app(Settings(models=[tiny_neural_bundle], db=tmp_path / "h.sqlite3", adapt_dir=blocker))
    with pytest.raises(ServeError, match="cannot create"):
        create_app(Settings(models=[tiny_neural_bundle], db=tmp_path / "h.sqlite3", adapt_dir=blocker / "sub"))


def test_crops_over_the_servers_image_limit_are_skipped_not_decoded(make_client, sample_files, tmp_path):
    client = make_client(adapt_dir=tmp_path / "adapted", max_image_pixels=1000)
    r = client.post("/api/models/adapt", files=_files(sample_files), data={"name": "ok"})
    assert r.status_code == 422 and "got 0 (3 unreadable: " in r.json()["detail"]
