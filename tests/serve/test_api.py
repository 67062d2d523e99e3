"""REST API behaviour with FastAPI's TestClient on a tiny neural bundle and real PBC samples."""
from __future__ import annotations

import base64
import csv
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image


def _files(*named: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def _decode_data_url(url: str, mime: str) -> Image.Image:
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class TestInfoEndpoints:
    def test_health(self, client):
        body = client.get("/api/health").json()
        assert body["status"] == "ok"
        assert body["models"] == ["tiny-test"]
        assert body["analyses"] == 0

    def test_models(self, client, tiny_neural_bundle):
        from hematoscope.bundle import load_bundle

        body = client.get("/api/models").json()
        assert body["default"] == "tiny-test"
        (info,) = body["data"]
        assert info["labels"] == load_bundle(tiny_neural_bundle).labels
        assert info["kind"] == "neural" and info["default"] is True
        assert info["input_size"] == 64
        assert info["explanation"] == "grad-cam"
        assert len(info["id"]) == 16
        assert info["framing"] == 1.0 and info["ood_limits"] is None  # no OOD flag fitted

    def test_page_and_static_files(self, client):
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/static/app.js" in page.text
        for asset in ("/static/app.js", "/static/style.css"):
            assert client.get(asset).status_code == 200

    def test_openapi_lists_every_endpoint(self, client):
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/api/predict", "/api/models", "/api/health", "/api/analyses", "/api/analyses/{analysis_id}",
                "/api/analyses/{analysis_id}/report.csv", "/api/analyses/{analysis_id}/corrections",
                "/api/analyses/{analysis_id}/items/{index}/image",
                "/api/analyses/{analysis_id}/items/{index}/heatmap"} <= set(paths)
        assert {"patch", "post"} <= set(paths["/api/analyses/{analysis_id}/corrections"])


class TestPredict:
    def test_batch_with_bad_files(self, client, sample_files, tiny_neural_bundle):
        from hematoscope.bundle import load_bundle

        good = [(p.name, p.read_bytes()) for p in sample_files]
        truncated = ("cut.jpg", sample_files[0].read_bytes()[:400])
        text = ("notes.txt", b"not an image")
        r = client.post("/api/predict?top_k=3", files=_files(good[0], truncated, *good[1:], text))
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["n_images"] == 5 and a["n_errors"] == 2
        assert [it["source"] for it in a["items"]] == [good[0][0], "cut.jpg", good[1][0], good[2][0], "notes.txt"]
        assert a["items"][1]["error"] == "truncated file"
        assert "not an image" in a["items"][4]["error"]

        # The API answers what the library answers for the same images.
        expected = load_bundle(tiny_neural_bundle).predict([p for p in sample_files])
        answered = [it for it in a["items"] if it["error"] is None]
        assert [it["prediction"] for it in answered] == expected.predicted
        np.testing.assert_allclose([it["confidence"] for it in answered], expected.confidence, atol=1e-5)
        for it in answered:
            probs = [t["prob"] for t in it["top_k"]]
            assert len(probs) == 3 and probs == sorted(probs, reverse=True)
            assert it["top_k"][0]["label"] == it["prediction"]
            thumb = _decode_data_url(it["thumbnail"], "image/jpeg")
            assert max(thumb.size) <= 192
            assert it["heatmap"] is None  # not requested
            assert len(it["sha256"]) == 64

        diff = a["differential"]
        assert diff["classified"] + diff["abstained"] == 3 and diff["skipped"] == 2 and diff["total"] == 5
        assert sum(c["count"] for c in diff["classes"]) == diff["classified"]
        assert client.get("/api/health").json()["analyses"] == 1

    def test_each_image_is_kept_at_full_size_and_served_alone(self, make_client, sample_files, encode):
        from hematoscope.serve.analysis import VIEW_SIDE

        client = make_client(token="s3cret")
        auth = {"Authorization": "Bearer s3cret"}
        large = encode(np.random.default_rng(0).integers(0, 256, (1000, 800, 3), dtype=np.uint8))
        r = client.post("/api/predict", headers=auth, files=_files(
            (sample_files[0].name, sample_files[0].read_bytes()), ("cut.jpg", b"garbage"), ("large.png", large)))
        a = r.json()
        assert "view" not in a["items"][0]  # the analysis stays light: one image is fetched when opened
        url = f"/api/analyses/{a['id']}/items/{{}}/image"
        assert client.get(url.format(0)).status_code == 401
        cell = client.get(url.format(0), headers=auth)
        assert cell.status_code == 200 and cell.headers["content-type"] == "image/jpeg"
        assert cell.headers["cache-control"].startswith("private")
        with Image.open(sample_files[0]) as original:  # PBC's 360 px crop at its own size, not the 192 px card
            assert Image.open(io.BytesIO(cell.content)).size == original.size and max(original.size) > 192
        assert Image.open(io.BytesIO(client.get(url.format(2), headers=auth).content)).size == (
            round(800 * VIEW_SIDE / 1000), VIEW_SIDE)
        assert client.get(url.format(1), headers=auth).status_code == 404  # unreadable: nothing to show
        assert not a["items"][0]["heatmap_full"]  # no heatmap asked for: none at any size
        assert client.get(f"/api/analyses/{a['id']}/items/0/heatmap", headers=auth).status_code == 404
        assert client.get(url.format(3), headers=auth).status_code == 404
        assert client.get(url.format(-1), headers=auth).status_code == 422
        assert client.get("/api/analyses/nope/items/0/image", headers=auth).status_code == 404
        assert client.delete(f"/api/analyses/{a['id']}", headers=auth).status_code == 204
        assert client.get(url.format(0), headers=auth).status_code == 404

    def test_gradcam_overlay(self, client, sample_files):
        r = client.post("/api/predict?gradcam=true", files=_files((sample_files[0].name, sample_files[0].read_bytes())))
        (item,) = r.json()["items"]
        overlay = _decode_data_url(item["heatmap"], "image/png")
        assert overlay.mode == "RGB" and max(overlay.size) <= 192
        assert item["explanation"]["method"] == "grad-cam"
        assert item["explanation"]["target"] == item["prediction"]

        # the same map drawn again over the full-size image: PBC's 360 px, where the card has 192
        assert item["heatmap_full"]
        base = f"/api/analyses/{r.json()['id']}/items/0"
        full = client.get(base + "/heatmap")
        assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
        assert full.headers["cache-control"].startswith("private")
        heat = Image.open(io.BytesIO(full.content)).convert("RGB")
        with Image.open(sample_files[0]) as original:
            assert heat.size == original.size and max(heat.size) > 192
        cell = np.asarray(Image.open(io.BytesIO(client.get(base + "/image").content)).convert("RGB"), np.float32)
        assert np.abs(np.asarray(heat, np.float32) - cell).mean() > 20  # the colour map is on it
        # ... where the card's overlay has it: shrunk to the card's size, the two agree
        shrunk = np.asarray(heat.resize(overlay.size, Image.Resampling.LANCZOS), np.float32)
        assert np.abs(shrunk - np.asarray(overlay, np.float32)).mean() < 5  # (a flipped map: 28)

    def test_zip_upload(self, client, sample_files, encode):
        archive = _zip({"cells/" + p.name: p.read_bytes() for p in sample_files[:2]}
                       | {"__MACOSX/cells/._x.jpg": b"resource fork", "cells/readme.md": b"# notes"})
        r = client.post("/api/predict", files=_files(("batch.zip", archive), ("single.png", encode(np.full((40, 40, 3), 200, np.uint8)))))
        a = r.json()
        sources = [it["source"] for it in a["items"]]
        assert sources == [f"batch.zip/cells/{sample_files[0].name}", f"batch.zip/cells/{sample_files[1].name}",
                           "batch.zip/cells/readme.md", "single.png"]
        assert a["n_errors"] == 1 and "not an image" in a["items"][2]["error"]

    def test_damaged_zip_is_one_unreadable_file_and_the_rest_are_answered(self, client, sample_files):
        """A zip that cannot be opened is an unreadable file like any other (an unsafe one refuses
        the request, below)."""
        truncated = _zip({"cells/a.jpg": sample_files[0].read_bytes()})[:100]
        r = client.post("/api/predict", files=_files(("damaged.zip", truncated), ("b.jpg", sample_files[1].read_bytes()),
                                                     ("empty.zip", b"")))
        assert r.status_code == 200
        a = r.json()
        assert [it["source"] for it in a["items"]] == ["damaged.zip", "b.jpg", "empty.zip"]
        assert a["n_errors"] == 2 and "not a readable zip" in a["items"][0]["error"]
        assert a["items"][1]["error"] is None and a["items"][1]["prediction"] in a["labels"]

    def test_unknown_model_is_404(self, client, sample_files):
        r = client.post("/api/predict?model=nope", files=_files(("a.jpg", sample_files[0].read_bytes())))
        assert r.status_code == 404 and "tiny-test" in r.json()["detail"]

    def test_no_readable_image_is_422(self, client):
        r = client.post("/api/predict", files=_files(("a.jpg", b"garbage"), ("b.png", b"")))
        assert r.status_code == 422
        assert "no readable image" in r.json()["detail"] and "empty file" in r.json()["detail"]
        assert client.get("/api/health").json()["analyses"] == 0

    def test_missing_files_field_is_422(self, client):
        assert client.post("/api/predict").status_code == 422

    def test_several_models_by_name(self, make_client, tiny_neural_bundle, sample_files):
        c = make_client(models=[tiny_neural_bundle, tiny_neural_bundle])
        assert [m["name"] for m in c.get("/api/models").json()["data"]] == ["tiny-test", "tiny-test-2"]
        r = c.post("/api/predict?model=tiny-test-2", files=_files(("a.jpg", sample_files[0].read_bytes())))
        assert r.json()["model"]["name"] == "tiny-test-2"

    def test_an_adapted_model_can_be_picked(self, make_client, tiny_neural_bundle, sample_files, tmp_path):
        from hematoscope import load_bundle

        cells = [np.asarray(Image.open(p).convert("RGB")) for p in sample_files] * 40
        adapted = load_bundle(tiny_neural_bundle).adapt(cells[:120], source="lab-x")
        c = make_client(models=[tiny_neural_bundle, adapted.save(tmp_path / "adapted")])
        info = {m["name"]: m for m in c.get("/api/models").json()["data"]}
        assert info["tiny-test"]["adapted_to"] is None
        assert info["tiny-test-adapted"]["adapted_to"] == "lab-x (120 images)"
        assert info["tiny-test-adapted"]["metrics_of"].startswith("the model before adaptation")
        assert info["tiny-test"]["metrics_of"] == "this model"
        r = c.post("/api/predict?model=tiny-test-adapted", files=_files(("a.jpg", sample_files[0].read_bytes())))
        assert r.status_code == 200 and r.json()["model"]["name"] == "tiny-test-adapted"

    def test_concurrent_requests(self, client, sample_files):
        data = sample_files[0].read_bytes()

        def post(i):
            return client.post("/api/predict", files=_files((f"{i}.jpg", data)))

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(12)))
        assert [r.status_code for r in responses] == [200] * 12
        assert len({r.json()["id"] for r in responses}) == 12
        assert len({r.json()["items"][0]["prediction"] for r in responses}) == 1
        assert client.get("/api/analyses").json()["count"] == 12


class TestLimits:
    def test_upload_over_limit_is_413(self, make_client, encode):
        c = make_client(max_upload_mb=0.05)
        noise = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
        r = c.post("/api/predict", files=_files(("big.png", encode(noise))))
        assert r.status_code == 413
        assert "0.05 MB limit" in r.json()["detail"]

    def test_streamed_upload_over_limit_is_413(self, make_client):
        c = make_client(max_upload_mb=0.05)
        boundary = "xyz"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode()
        chunks = iter([head] + [b"\0" * 16384] * 8 + [f"\r\n--{boundary}--\r\n".encode()])
        r = c.post("/api/predict", content=chunks,  # no Content-Length: sent chunked
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413

    def test_image_pixel_limit(self, make_client, encode):
        c = make_client(max_image_pixels=50 * 50)
        big, small = encode(np.zeros((60, 60, 3), np.uint8)), encode(np.zeros((40, 40, 3), np.uint8))
        alone = c.post("/api/predict", files=_files(("big.png", big)))
        assert alone.status_code == 422 and "too large" in alone.json()["detail"]
        mixed = c.post("/api/predict", files=_files(("big.png", big), ("small.png", small))).json()
        assert "too large" in mixed["items"][0]["error"] and mixed["items"][1]["error"] is None

    def test_too_many_files_is_422(self, make_client, encode):
        c = make_client(max_files=2)
        img = encode(np.zeros((20, 20, 3), np.uint8))
        r = c.post("/api/predict", files=_files(("a.zip", _zip({f"{i}.png": img for i in range(3)}))))
        assert r.status_code == 422 and "more than 2 images" in r.json()["detail"]

    def test_zip_path_traversal_rejected(self, client, encode):
        archive = _zip({"ok.png": encode(np.zeros((20, 20, 3), np.uint8)), "../../etc/evil.png": b"x"})
        r = client.post("/api/predict", files=_files(("attack.zip", archive)))
        assert r.status_code == 422 and "traversal" in r.json()["detail"]
        assert client.get("/api/health").json()["analyses"] == 0

    def test_zip_bomb_rejected(self, client):
        archive = _zip({"bomb.png": b"\0" * (24 * 1024 * 1024)})
        assert len(archive) < 64 * 1024
        r = client.post("/api/predict", files=_files(("bomb.zip", archive)))
        assert r.status_code == 422 and "zip bomb" in r.json()["detail"]

    def test_zip_unpacked_size_bounded_by_upload_limit(self, make_client):
        c = make_client(max_upload_mb=0.02)  # zips may unpack to 8 x the upload limit = 160 KB
        archive = _zip({f"{i}.png": b"\0" * 50_000 for i in range(4)})  # 200 KB, each below the bomb check
        assert len(archive) < 0.02 * 2**20
        r = c.post("/api/predict", files=_files(("many.zip", archive)))
        assert r.status_code == 422 and "unpacks to more than" in r.json()["detail"]


class TestAuth:
    def test_token_required_except_health_and_page(self, make_client, sample_files):
        c = make_client(token="s3cret")
        assert c.get("/api/health").status_code == 200
        assert c.get("/").status_code == 200
        assert c.get("/api/models").status_code == 401
        assert c.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/analyses", headers={"X-API-Token": "s3cret"}).status_code == 200
        files = _files(("a.jpg", sample_files[0].read_bytes()))
        assert c.post("/api/predict", files=files).status_code == 401
        r = c.post("/api/predict", files=files, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert c.get(f"/api/analyses/{r.json()['id']}").status_code == 401
        assert c.get(f"/api/analyses/{r.json()['id']}/report.csv").status_code == 401

    def test_token_from_environment(self, monkeypatch, make_client):
        monkeypatch.setenv("HEMATOSCOPE_TOKEN", "from-env")
        c = make_client()
        assert c.get("/api/models").status_code == 401
        assert c.get("/api/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


class TestHistory:
    def _post(self, client, sample_files, n=3):
        r = client.post("/api/predict", files=_files(*[(p.name, p.read_bytes()) for p in sample_files[:n]],
                                                     ("bad.jpg", b"nope")))
        assert r.status_code == 200
        return r.json()

    def test_list_and_get(self, client, sample_files):
        first = self._post(client, sample_files, 1)
        second = self._post(client, sample_files, 3)
        listing = client.get("/api/analyses").json()
        assert listing["count"] == 2
        assert [row["id"] for row in listing["data"]] == [second["id"], first["id"]]
        assert listing["data"][0]["n_images"] == 4 and listing["data"][0]["n_errors"] == 1
        assert [row["id"] for row in client.get("/api/analyses?limit=1&offset=1").json()["data"]] == [first["id"]]
        again = client.get(f"/api/analyses/{second['id']}").json()
        assert again == second
        light = client.get(f"/api/analyses/{second['id']}?images=false").json()
        assert [it["thumbnail"] for it in light["items"]] == [None] * 4
        assert [it["prediction"] for it in light["items"]] == [it["prediction"] for it in second["items"]]
        assert client.get("/api/analyses/unknown").status_code == 404

    def test_csv_report(self, client, sample_files):
        a = self._post(client, sample_files)
        r = client.get(f"/api/analyses/{a['id']}/report.csv")
        assert r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [row["source"] for row in rows] == [it["source"] for it in a["items"]]
        assert [row["prediction"] for row in rows[:3]] == [it["prediction"] for it in a["items"][:3]]
        assert rows[3]["error"] and rows[3]["prediction"] == ""
        assert rows[0]["sha256"] == a["items"][0]["sha256"]
        assert {(row["analysis_id"], row["analysed_at"], row["model"]) for row in rows} == \
            {(a["id"], a["created"], a["model"]["name"])}

    def test_sample_id_is_stored_listed_exported_and_editable(self, client, sample_files):
        files = _files(*[(p.name, p.read_bytes()) for p in sample_files[:2]])
        r = client.post("/api/predict", files=files, data={"sample": "  Slide 2026/118-B  "})
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["sample"] == "Slide 2026/118-B"  # surrounding spaces dropped
        assert client.get("/api/analyses").json()["data"][0]["sample"] == "Slide 2026/118-B"
        client.post("/api/predict", files=files, data={"sample": "Slide 7"})
        hits = client.get("/api/analyses", params={"sample": "118"}).json()
        assert hits["count"] == 1 and hits["data"][0]["id"] == a["id"]
        assert client.get("/api/analyses", params={"sample": "x" * 101}).status_code == 422
        report = client.get(f"/api/analyses/{a['id']}/report.csv")
        assert {row["sample"] for row in csv.DictReader(io.StringIO(report.text))} == {"Slide 2026/118-B"}
        assert 'Slide_2026_118-B' in report.headers["content-disposition"]  # no slash in the file name
        r = client.patch(f"/api/analyses/{a['id']}", json={"sample": "=HYPERLINK(1)"})
        assert r.status_code == 200 and r.json()["sample"] == "=HYPERLINK(1)"
        rows = list(csv.DictReader(io.StringIO(client.get(f"/api/analyses/{a['id']}/report.csv").text)))
        assert rows[0]["sample"] == "'=HYPERLINK(1)"  # a spreadsheet shows it, does not run it
        assert client.patch(f"/api/analyses/{a['id']}", json={"sample": ""}).json()["sample"] == ""
        assert client.patch("/api/analyses/unknown", json={"sample": "x"}).status_code == 404

    @pytest.mark.parametrize("sample, message", [("a" * 101, "at most 100"), ("slide\n7", "control"),
                                                 ("bad\u202eid", "control")])
    def test_bad_sample_ids_are_refused_before_anything_is_stored(self, client, sample_files, sample, message):
        files = _files((sample_files[0].name, sample_files[0].read_bytes()))
        r = client.post("/api/predict", files=files, data={"sample": sample})
        assert r.status_code == 422 and message in r.text
        assert client.get("/api/analyses").json()["count"] == 0
        a = client.post("/api/predict", files=files).json()
        r = client.patch(f"/api/analyses/{a['id']}", json={"sample": sample})
        assert r.status_code == 422 and message in r.text

    @pytest.mark.parametrize("value", ["nan", "inf", "-1", "0.97", "abc", "", "0.990000001"])
    def test_bad_operating_points_are_refused_before_anything_is_stored(self, client, sample_files, value):
        files = _files((sample_files[0].name, sample_files[0].read_bytes()))
        r = client.post(f"/api/predict?ood_accept={value}", files=files)
        assert r.status_code == 422, r.text
        if value == "0.990000001":  # named as given, not rounded to a listed level
            assert "0.990000001 is not an operating point" in r.text
        assert client.get("/api/analyses").json()["count"] == 0

    def test_differential_csv_gives_the_count_as_given_and_as_corrected(self, client, sample_files):
        a = self._post(client, sample_files, 3)
        first = a["items"][0]
        other = next(lab for lab in a["labels"] if lab != first["prediction"])
        client.patch(f"/api/analyses/{a['id']}", json={"sample": "S-9"})
        client.patch(f"/api/analyses/{a['id']}/corrections", json={"corrections": [{"index": 0, "label": other}]})
        r = client.get(f"/api/analyses/{a['id']}/differential.csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "S-9" in r.headers["content-disposition"] and "-count.csv" in r.headers["content-disposition"]
        rows = {row["class"]: row for row in csv.DictReader(io.StringIO(r.text))}
        assert list(rows) == a["labels"] + ["abstained", "unreadable"]
        given = {c["label"]: c["count"] for c in a["differential"]["classes"]}
        assert {k: int(rows[k]["count"]) for k in a["labels"]} == given
        assert int(rows["unreadable"]["count"]) == 1 and int(rows["abstained"]["count"]) == a["differential"]["abstained"]
        assert int(rows[other]["corrected_count"]) == given[other] + 1
        if not first["abstain"]:
            assert int(rows[first["prediction"]]["corrected_count"]) == given[first["prediction"]] - 1
        assert sum(int(rows[k]["corrected_count"]) for k in rows) == 4
        assert {(row["sample"], row["analysis_id"]) for row in rows.values()} == {("S-9", a["id"])}
        counted = sum(given.values())
        assert float(rows[other]["percent"]) == pytest.approx(100 * given[other] / max(counted, 1), abs=0.01)
        assert client.get("/api/analyses/unknown/differential.csv").status_code == 404

    def test_corrections(self, client, sample_files):
        a = self._post(client, sample_files)
        labels = a["labels"]
        target = next(lab for lab in labels if lab != a["items"][0]["prediction"])
        r = client.patch(f"/api/analyses/{a['id']}/corrections",
                         json={"corrections": [{"index": 0, "label": target, "note": "checked by hand"}]})
        assert r.status_code == 200
        updated = r.json()
        assert updated["items"][0]["correction"]["label"] == target
        assert updated["items"][0]["correction"]["note"] == "checked by hand"
        corrected = {c["label"]: c["count"] for c in updated["corrected_differential"]["classes"]}
        original = {c["label"]: c["count"] for c in a["differential"]["classes"]}
        if not a["items"][0]["abstain"]:
            assert corrected[a["items"][0]["prediction"]] == original[a["items"][0]["prediction"]] - 1
        assert corrected[target] == original[target] + 1
        assert updated["differential"] == a["differential"]  # the model's own count is kept

        rows = list(csv.DictReader(io.StringIO(client.get(f"/api/analyses/{a['id']}/report.csv").text)))
        assert rows[0]["corrected_label"] == target and rows[1]["corrected_label"] == ""
        listed = client.get("/api/analyses").json()["data"][0]
        assert listed["n_corrections"] == 1
        # the history lists the count as corrected, beside the model's own
        assert listed["corrected_differential"] == updated["corrected_differential"]
        assert listed["differential"] == a["differential"]

        # POST works too, and label null removes the correction.
        r = client.post(f"/api/analyses/{a['id']}/corrections", json={"corrections": [{"index": 0, "label": None}]})
        assert r.json()["items"][0]["correction"] is None and r.json()["corrected_differential"] is None
        assert client.get("/api/analyses").json()["data"][0]["corrected_differential"] is None

    @pytest.mark.parametrize("body, status, message", [
        ({"corrections": [{"index": 0, "label": "martian_cell"}]}, 422, "not one of this model's classes"),
        ({"corrections": [{"index": 99, "label": "neutrophil"}]}, 404, "no image 99"),
        ({"corrections": [{"index": 3, "label": "neutrophil"}]}, 422, "could not be read"),
        ({"corrections": []}, 422, None),
        ({"corrections": [{"index": 0, "label": "basophil"}, {"index": 0, "label": "monocyte"}]}, 422,
         "image 0 is corrected twice in one request"),
    ])
    def test_bad_corrections(self, client, sample_files, body, status, message):
        a = self._post(client, sample_files)
        r = client.patch(f"/api/analyses/{a['id']}/corrections", json=body)
        assert r.status_code == status
        if message:
            assert message in str(r.json()["detail"])  # a message, or the validation error's list
        assert client.get(f"/api/analyses/{a['id']}").json()["items"][0]["correction"] is None

    def test_corrections_on_unknown_analysis(self, client):
        r = client.patch("/api/analyses/nope/corrections", json={"corrections": [{"index": 0, "label": "neutrophil"}]})
        assert r.status_code == 404

    def test_survives_restart(self, make_client, sample_files, tmp_path):
        db = tmp_path / "shared.sqlite3"
        first = make_client(db=db)
        a = self._post(first, sample_files)
        label = a["labels"][0]
        first.patch(f"/api/analyses/{a['id']}/corrections", json={"corrections": [{"index": 1, "label": label}]})
        before = first.get(f"/api/analyses/{a['id']}").json()
        first.__exit__(None, None, None)

        second = make_client(db=db)  # a new app, as after a restart
        assert second.get("/api/analyses").json()["count"] == 1
        after = second.get(f"/api/analyses/{a['id']}").json()
        assert after == before
        assert after["items"][1]["correction"]["label"] == label


class TestClassicalBundle:
    def test_segmentation_and_features_instead_of_gradcam(self, make_client, tiny_classical_bundle, sample_files):
        c = make_client(models=[tiny_classical_bundle])
        assert c.get("/api/models").json()["data"][0]["explanation"] == "segmentation"
        r = c.post("/api/predict?gradcam=true", files=_files((sample_files[0].name, sample_files[0].read_bytes())))
        (item,) = r.json()["items"]
        explanation = item["explanation"]
        assert explanation["method"] == "segmentation" and explanation["target"] == item["prediction"]
        assert len(explanation["features"]) == 5
        assert all(f["name"] and f["contribution"] is not None for f in explanation["features"])
        overlay = _decode_data_url(item["heatmap"], "image/png")  # a real cell segments
        assert overlay.mode == "RGB"
        # the outlines drawn again over the full-size image (PBC's 360 px, where the card has 192),
        # sharp there and where the card has them
        assert item["heatmap_full"]
        base = f"/api/analyses/{r.json()['id']}/items/0"
        full = Image.open(io.BytesIO(c.get(base + "/heatmap").content)).convert("RGB")
        with Image.open(sample_files[0]) as original:
            assert full.size == original.size and max(full.size) > 192
        def yellow(a: np.ndarray) -> np.ndarray:
            return (a[..., 0] > 200) & (a[..., 1] > 170) & (a[..., 2] < 90)

        drawn = np.asarray(full, np.float32)
        cell = np.asarray(Image.open(io.BytesIO(c.get(base + "/image").content)).convert("RGB"), np.float32)
        lines = yellow(drawn)
        assert 0.002 < lines.mean() < 0.2 and ((cell[..., 2] < 90) & lines).sum() < lines.sum() / 10  # lines only
        shrunk = np.asarray(full.resize(overlay.size, Image.Resampling.LANCZOS), np.float32)
        card = np.asarray(overlay, np.float32)
        assert yellow(card).any() and np.abs(shrunk - card).mean() < 8  # (flipped: 30)


def test_each_cell_carries_the_limit_that_decided_its_flag(make_client, lisc_root, tmp_path):
    """The page shows a cell's score against the limit its flag was decided with: the default
    model's thresholds differ by view count (its cascade answers some cells from 2 views) and
    move with the operating point, so one model-wide threshold mislabelled cells either side."""
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    client = make_client(models=[DEFAULT_MODEL_DIR])
    files = _files(*[(p.name, p.read_bytes()) for p in sorted(lisc_root.rglob("*.jpg"))[::15][:80]])
    limits = {}
    for point in ("", "?ood_accept=0.99"):
        items = client.post(f"/api/predict{point}", files=files).json()["items"]
        for it in items:
            assert it["ood_flag"] == (it["ood_score"] > it["ood_limit"]), it
        limits[point] = {it["views"]: it["ood_limit"] for it in items}
    assert len(limits[""]) == 2  # 1 and 2 views, each with its own limit
    assert all(limits["?ood_accept=0.99"][v] > limits[""][v] for v in limits[""])
    # a server started with the flag moved gives a request the flag as fitted back
    loose = make_client(models=[DEFAULT_MODEL_DIR], ood_accept=0.99, db=tmp_path / "loose.sqlite3")
    assert loose.get("/api/models").json()["data"][0]["ood_accept"] == 0.99
    a = loose.post("/api/predict?ood_accept=fitted", files=files).json()
    assert {it["views"]: it["ood_limit"] for it in a["items"]} == limits[""] and a["model"]["ood_accept"] is None
    served = loose.post("/api/predict", files=files).json()
    assert {it["views"]: it["ood_limit"] for it in served["items"]} == limits["?ood_accept=0.99"]
    assert served["model"]["ood_accept"] == 0.99
