"""The web app under a careless user and an attacker: bounded decoded pixels, validated query
bounds, spreadsheet-safe CSV, trusted hosts, the cross-site guard and a private history."""
from __future__ import annotations

import csv
import gc
import io
import os
import sqlite3
import stat
import sys
import threading
import time

import numpy as np
import pytest


def _files(*named: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples this process's resident memory every 2 ms while the block runs."""

    def __enter__(self):
        gc.collect()
        self.baseline = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


# --- 1. decoded pixels ---------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_decoded_memory_is_bounded_per_request(make_client, encode):
    """16 flat 2048x2048 PNGs (~8 KB each) decode to 201 MB of pixels; decoded batch by batch
    within a 4.2-megapixel budget the server grows by far less than that."""
    side = 2048
    c = make_client(max_image_pixels=side * side, max_decoded_megapixels=side * side / 1e6)
    flat = encode(np.full((side, side, 3), 200, np.uint8))
    assert len(flat) < 64 * 1024
    small = encode(np.full((48, 48, 3), 90, np.uint8))
    assert c.post("/api/predict", files=_files(("warm.png", small))).status_code == 200  # lazy imports
    all_at_once_mb = 16 * side * side * 3 / 2**20
    with _PeakRss() as rss:
        r = c.post("/api/predict", files=_files(*[(f"flat_{i}.png", flat) for i in range(16)]))
    assert r.status_code == 200, r.text
    assert r.json()["n_images"] == 16 and r.json()["n_errors"] == 0
    assert rss.growth_mb < 96, f"RSS grew by {rss.growth_mb:.0f} MB (all images at once: {all_at_once_mb:.0f} MB)"
    assert c.app.state.pixel_budget.used == 0


def test_request_over_the_pixel_limit_is_413_before_decoding(make_client, encode, monkeypatch):
    c = make_client(max_request_megapixels=10)
    flat = encode(np.full((2000, 2000, 3), 7, np.uint8))
    import hematoscope.data.images as images

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the request is over its pixel limit")

    monkeypatch.setattr(images, "load_image", no_decoding)
    r = c.post("/api/predict", files=_files(*[(f"{i}.png", flat) for i in range(3)]))
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "12.0 megapixels" in detail and "10 megapixel limit" in detail and "--max-request-megapixels" in detail
    assert c.get("/api/analyses").json()["count"] == 0


def test_pixel_budget_waits_for_other_requests_and_refuses_the_impossible():
    from hematoscope.serve.analysis import PixelBudget, UploadTooLarge

    budget = PixelBudget(100)
    order, release = [], threading.Event()

    def second():
        with budget.reserve(50):
            order.append(("second", budget.used))
            release.wait(5)

    with budget.reserve(70):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.1)
        assert order == [] and budget.used == 70  # 70 + 50 > 100: the second one waits
        order.append("first done")
    release.set()
    t.join(5)
    assert order == ["first done", ("second", 50)] and budget.used == 0
    with pytest.raises(UploadTooLarge, match="decode budget"):
        with budget.reserve(101):
            pass


def test_budget_must_hold_one_image():
    from hematoscope.serve.config import Settings

    with pytest.raises(ValueError, match="max_decoded_megapixels"):
        Settings(max_image_pixels=25_000_000, max_decoded_megapixels=10)


def test_concurrent_requests_share_a_one_image_budget(make_client, sample_files):
    from concurrent.futures import ThreadPoolExecutor

    c = make_client(max_image_pixels=400 * 400, max_decoded_megapixels=0.16)
    data = sample_files[0].read_bytes()  # 360x363 px
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: c.post("/api/predict", files=_files((f"{i}.jpg", data), ("b.jpg", data))),
                                  range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    assert c.app.state.pixel_budget.used == 0


# --- 2. query bounds -------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["offset=99999999999999999999", "offset=-1", "limit=0", "limit=100000"])
def test_out_of_range_query_is_422(client, query):
    r = client.get(f"/api/analyses?{query}")
    assert r.status_code == 422, r.text


def test_largest_offset_is_answered(client):
    r = client.get(f"/api/analyses?offset={2**63 - 1}")
    assert r.status_code == 200 and r.json()["data"] == []


@pytest.mark.parametrize("body", ['{"sample": NaN}', '{"sample": Infinity}', '{"sample": 1e999}',
                                  '{"corrections": NaN}', '{"corrections": [{"index": 1e400, "label": "eosinophil"}]}'])
def test_json_numbers_json_cannot_hold_are_422_not_500(client, sample_files, body):
    a = client.post("/api/predict", files=_files((sample_files[0].name, sample_files[0].read_bytes()))).json()
    where = f"/api/analyses/{a['id']}" + ("/corrections" if "corrections" in body else "")
    r = client.patch(where, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]  # says what is wrong, the odd number written as text


# --- 3. CSV formula injection ----------------------------------------------------------------
def test_csv_report_neutralises_formula_cells(client, sample_files):
    data = sample_files[0].read_bytes()
    names = ["=cmd|'/c calc'!A1.jpg", "+1+2.jpg", "-2+3.jpg", "@SUM(A1).jpg", "plain.jpg"]
    a = client.post("/api/predict", files=_files(*[(n, data) for n in names])).json()
    client.post(f"/api/analyses/{a['id']}/corrections",
                json={"corrections": [{"index": 4, "label": "neutrophil", "note": "=HYPERLINK(\"http://x\")"}]})
    text = client.get(f"/api/analyses/{a['id']}/report.csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["source"] for r in rows] == ["'" + n for n in names[:4]] + ["plain.jpg"]
    assert rows[4]["correction_note"] == "'=HYPERLINK(\"http://x\")"
    assert float(rows[0]["confidence"]) > 0  # numbers stay numbers
    assert a["items"][0]["source"] == names[0]  # the API itself keeps the real name


# --- 4. Host and Origin ------------------------------------------------------------------------
def test_untrusted_host_is_refused(make_client):
    c = make_client()
    assert c.get("/api/health", headers={"Host": "attacker.example"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert c.get("/api/health", headers={"Host": host}).status_code == 200, host
    lab = make_client(allowed_hosts=["cells.lab.example", "*.ward.example"], host="10.0.0.5")
    for host in ("cells.lab.example", "pc1.ward.example:8000", "10.0.0.5:8000", "localhost"):
        assert lab.get("/api/health", headers={"Host": host}).status_code == 200, host
    assert lab.get("/api/health", headers={"Host": "attacker.example"}).status_code == 400


def test_allowed_hosts_from_environment_comma_separated(monkeypatch):
    from hematoscope.serve.config import Settings

    monkeypatch.setenv("HEMATOSCOPE_ALLOWED_HOSTS", "a.example, b.example")
    assert Settings().trusted_hosts() == ["localhost", "127.0.0.1", "[::1]", "a.example", "b.example"]
    with pytest.raises(ValueError, match="wildcards"):
        Settings(allowed_hosts=["lab.*.example"])
    with pytest.raises(ValueError, match="allowed origin"):
        Settings(allowed_origins=["https://lab.example/path"])


def test_cross_site_post_is_refused(client, sample_files):
    files = _files(("a.jpg", sample_files[0].read_bytes()))
    for headers in ({"Origin": "https://attacker.example"}, {"Origin": "null"},
                    {"Origin": "http://localhost:3000"},  # another port is another site
                    {"Referer": "https://attacker.example/page.html"}):
        r = client.post("/api/predict", files=files, headers=headers)
        assert r.status_code == 403, headers
        assert "cross-site request refused" in r.json()["detail"]
    assert client.get("/api/analyses").json()["count"] == 0
    # the server's own page, a TLS proxy in front of it, and clients that send neither header
    for headers in ({"Origin": "http://localhost"}, {"Origin": "https://localhost"},
                    {"Referer": "http://localhost/"}, {}):
        assert client.post("/api/predict", files=files, headers=headers).status_code == 200, headers
    a = client.get("/api/analyses").json()["data"][0]["id"]
    bad = client.request("DELETE", f"/api/analyses/{a}", headers={"Origin": "https://attacker.example"})
    assert bad.status_code == 403
    # reads stay open to links from elsewhere
    assert client.get(f"/api/analyses/{a}", headers={"Origin": "https://attacker.example"}).status_code == 200


def test_allowed_origin_may_post(make_client, sample_files):
    c = make_client(allowed_origins=["https://Portal.Lab.example:443"])
    files = _files(("a.jpg", sample_files[0].read_bytes()))
    assert c.post("/api/predict", files=files, headers={"Origin": "https://portal.lab.example"}).status_code == 200
    assert c.post("/api/predict", files=files, headers={"Origin": "http://portal.lab.example"}).status_code == 403


# --- 5. history privacy ----------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_history_file_is_private(make_client, tmp_path):
    db = tmp_path / "private" / "history.sqlite3"
    make_client(db=db)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for side in db.parent.glob("history.sqlite3-*"):  # -wal / -shm
        assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0, side
    old = tmp_path / "old.sqlite3"
    old.touch(mode=0o644)
    os.chmod(old, 0o644)
    from hematoscope.serve.storage import HistoryStore

    HistoryStore(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_delete_an_analysis(make_client, sample_files, tmp_path):
    db = tmp_path / "h.sqlite3"
    c = make_client(db=db)
    data = sample_files[0].read_bytes()
    keep = c.post("/api/predict", files=_files(("keep.jpg", sample_files[1].read_bytes()))).json()
    gone = c.post("/api/predict", files=_files(("secret-patient-name.jpg", data))).json()
    c.post(f"/api/analyses/{gone['id']}/corrections", json={"corrections": [{"index": 0, "label": "neutrophil"}]})
    assert c.delete(f"/api/analyses/{gone['id']}").status_code == 204
    assert c.get(f"/api/analyses/{gone['id']}").status_code == 404
    assert c.delete(f"/api/analyses/{gone['id']}").status_code == 404
    assert [a["id"] for a in c.get("/api/analyses").json()["data"]] == [keep["id"]]
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 1
        assert con.execute("SELECT COUNT(*) FROM corrections").fetchone()[0] == 0
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("h.sqlite3*"))
    assert b"secret-patient-name" not in on_disk  # overwritten, not left in free pages or the WAL


def test_retention_deletes_old_analyses(make_client, sample_files, tmp_path):
    db = tmp_path / "h.sqlite3"
    c = make_client(db=db)
    files = _files(("a.jpg", sample_files[0].read_bytes()))
    old = c.post("/api/predict", files=files).json()["id"]
    with sqlite3.connect(db) as con:
        con.execute("UPDATE analyses SET created = '2020-01-01T00:00:00.000+00:00' WHERE id = ?", (old,))
    c2 = make_client(db=db, retention_days=30)  # at start-up
    assert c2.get("/api/analyses").json()["count"] == 0
    fresh = c2.post("/api/predict", files=files).json()["id"]
    with sqlite3.connect(db) as con:
        con.execute("UPDATE analyses SET created = '2020-01-01T00:00:00.000+00:00' WHERE id = ?", (fresh,))
    newest = c2.post("/api/predict", files=files).json()["id"]  # and after each new analysis
    assert [a["id"] for a in c2.get("/api/analyses").json()["data"]] == [newest]


def test_health_tells_the_count_only_with_the_token(make_client, sample_files):
    c = make_client(token="s3cret")
    body = c.get("/api/health").json()
    assert body["status"] == "ok" and body["analyses"] is None
    assert c.get("/api/health", headers={"Authorization": "Bearer s3cret"}).json()["analyses"] == 0


# --- the command line ----------------------------------------------------------------------
def test_serve_options_and_environment(tiny_neural_bundle, tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from hematoscope.cli.main import app

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: started.update(app=application, **kw))
    monkeypatch.setenv("HEMATOSCOPE_MAX_REQUEST_MEGAPIXELS", "5")
    monkeypatch.setenv("HEMATOSCOPE_MAX_UPLOAD_MB", "3")
    res = CliRunner().invoke(app, ["serve", "-m", str(tiny_neural_bundle), "--db", str(tmp_path / "h.db"),
                                   "--host", "0.0.0.0", "--token", "t", "--allowed-host", "cells.lab.example",
                                   "--allowed-origin", "https://portal.lab.example", "--retention-days", "30"])
    assert res.exit_code == 0, res.output
    s = started["app"].state.settings
    assert s.trusted_hosts() == ["localhost", "127.0.0.1", "[::1]", "cells.lab.example"]
    assert s.allowed_origins == ["https://portal.lab.example"] and s.retention_days == 30
    assert s.max_request_megapixels == 5 and s.max_upload_mb == 3  # from the environment
    assert "only local host names" not in res.output
    res = CliRunner().invoke(app, ["serve", "-m", str(tiny_neural_bundle), "--db", str(tmp_path / "h.db"),
                                   "--host", "0.0.0.0", "--token", "t"])
    assert res.exit_code == 0 and "only local host names" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["serve", "-m", str(tiny_neural_bundle), "--db", str(tmp_path / "h.db"),
                                   "--allowed-origin", "https://x.example/path"])
    assert res.exit_code == 2 and "allowed origin" in " ".join(res.output.split())


def test_a_body_that_stalls_mid_upload_gets_408_and_a_finished_one_no_limit():
    """A client that sends part of a body and then nothing is answered 408 once the body timeout
    passes (the connection is freed); once the body is complete, waiting on receive (as a
    streaming response does for a disconnect) is not timed."""
    import anyio
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    from hematoscope.serve.app import _UploadLimit

    async def echo(scope, receive, send):
        body = await Request(scope, receive).body()
        await PlainTextResponse(f"{len(body)} bytes")(scope, receive, send)

    def scope():
        return {"type": "http", "method": "POST", "path": "/api/predict", "headers": [], "query_string": b""}

    async def run(messages, pause_after):
        sent = []

        async def receive():
            if messages:
                return messages.pop(0)
            await anyio.sleep(pause_after)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await _UploadLimit(echo, max_bytes=10**6, max_mb=1, body_timeout_s=0.2)(scope(), receive, send)
        return sent

    stalled = anyio.run(run, [{"type": "http.request", "body": b"abc", "more_body": True}], 30)
    assert stalled[0]["status"] == 408 and b"no part of the request body arrived" in stalled[1]["body"]
    done = anyio.run(run, [{"type": "http.request", "body": b"abc", "more_body": False}], 30)
    assert done[0]["status"] == 200 and done[1]["body"] == b"3 bytes"
