"""The OOD flag's operating point (``--ood-accept``) on the shipped model: moved without the
training data, the same through the CLI, the server and the Python API."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.bundle.base import BundleError
from hematoscope.bundle.config import BundleConfig
from hematoscope.bundle.ood import OOD_ACCEPT_LEVELS


@pytest.fixture(scope="module")
def answers(lisc_files):
    """The shipped model's answers on another lab's crops, as fitted and with the loosest flag."""
    bundle = load_bundle("default")
    strict = bundle.predict(lisc_files)
    bundle.set_ood_accept(0.99)
    return strict, bundle.predict(lisc_files)


def test_the_shipped_model_stores_a_threshold_per_share_for_every_view_count():
    bundle = load_bundle("default")
    cfg = bundle.config
    assert cfg.ood_accept is None and bundle.ood_accept_shares() == list(OOD_ACCEPT_LEVELS)
    for levels in [cfg.ood.accept_levels] + [e.ood_accept_levels for e in cfg.view_trust.values()]:
        assert [float(q) for q in levels] == list(OOD_ACCEPT_LEVELS)
        assert list(levels.values()) == sorted(levels.values())
    # fitted to answer 95 % of validation cells with the abstain rule: between the 95 and 97.5 % levels
    one = cfg.view_trust["1"]
    assert one.ood_accept_levels["0.95"] <= one.ood_threshold <= one.ood_accept_levels["0.975"]


def test_a_looser_flag_answers_more_of_another_labs_cells(answers):
    strict, loose = answers
    assert loose.ood_flag.sum() < strict.ood_flag.sum()
    assert not (loose.ood_flag & ~strict.ood_flag).any()  # looser flags a subset
    assert loose.abstain.mean() < strict.abstain.mean()


def test_cli_server_and_api_agree_and_bad_shares_are_refused(answers, lisc_files, tmp_path):
    from fastapi.testclient import TestClient

    from hematoscope.cli.main import app
    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    _, loose = answers
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", *map(str, lisc_files), "--ood-accept", "0.99", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out, keep_default_na=False)
    assert table["abstain"].astype(bool).tolist() == loose.abstain.tolist()

    with TestClient(create_app(Settings(db=tmp_path / "h.sqlite3", ood_accept=0.99)),
                    base_url="http://localhost") as client:
        assert client.get("/api/models").json()["data"][0]["ood_accept"] == 0.99
        r = client.post("/api/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in lisc_files])
    assert r.status_code == 200, r.text
    assert [item["abstain"] for item in r.json()["items"]] == loose.abstain.tolist()

    r = CliRunner().invoke(app, ["predict", str(lisc_files[0]), "--ood-accept", "0.97"])
    assert r.exit_code != 0 and "0.8, 0.9, 0.95, 0.975, 0.99" in r.output


def test_a_bundle_fitted_before_the_levels_says_to_refit(tmp_path):
    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings
    from hematoscope.serve.deps import ServeError

    old = load_bundle("default").save(tmp_path / "old")
    raw = json.loads((old / "config.json").read_text())
    del raw["ood"]["accept_levels"]
    for entry in raw["view_trust"].values():
        del entry["ood_accept_levels"]
    raw["view_trust_of"] = BundleConfig(**raw).trust_fingerprint()  # as fitted without levels
    (old / "config.json").write_text(json.dumps(raw))
    bundle = load_bundle(old)
    assert bundle.uses_cascade and bundle.ood_accept_shares() == []
    with pytest.raises(BundleError, match="trust fit"):
        bundle.set_ood_accept(0.99)
    with pytest.raises(ServeError, match="--ood-accept"):
        create_app(Settings(models=[old], db=tmp_path / "h.sqlite3", ood_accept=0.99))
    np.testing.assert_array_equal(bundle.predict([np.zeros((40, 40, 3), np.uint8)]).abstain, [True])


def test_evaluate_scores_the_moved_flag(lisc_folder, tmp_path):
    from hematoscope.cli.main import app

    abstained = {}
    for extra in ([], ["--ood-accept", "0.99"]):
        out = tmp_path / f"r{len(extra)}.json"
        r = CliRunner().invoke(app, ["evaluate", "default", str(lisc_folder), "--json", str(out), *extra])
        assert r.exit_code == 0, r.output
        abstained[bool(extra)] = json.loads(out.read_text())["abstained"]
    assert abstained[True] < abstained[False]


def test_a_classical_bundle_moves_its_anomaly_flag_the_same_way(tiny_classical_bundle, pbc_subset):
    """The IsolationForest flag of the classical kind stores its levels through the same fit."""
    bundle = load_bundle(tiny_classical_bundle)
    assert bundle.config.ood.method == "isolation_forest"
    files = sorted(pbc_subset.rglob("*.jpg"))[::3]
    fitted = bundle.predict(files).ood_flag
    bundle.set_ood_accept(0.8)  # stricter than fitted: flags a superset
    strict = bundle.predict(files).ood_flag
    assert bundle.trust_for().ood_threshold == bundle.config.ood.accept_levels["0.8"] < bundle.config.ood.threshold
    assert not (fitted & ~strict).any() and strict.sum() > fitted.sum()


def test_a_request_moves_the_flag_for_its_own_analysis_only(answers, lisc_files, tmp_path):
    """One server, as fitted: an analysis may ask for a looser flag (stored with it and in its
    CSV); the next one without is answered as fitted; an operating point not stored is refused."""
    import csv
    import io

    from fastapi.testclient import TestClient

    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    strict, loose = answers
    files = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in lisc_files]
    with TestClient(create_app(Settings(db=tmp_path / "h.sqlite3")), base_url="http://localhost") as client:
        info = client.get("/api/models").json()["data"][0]
        moved = client.post("/api/predict?ood_accept=0.99", files=files).json()
        plain = client.post("/api/predict", files=files).json()
        bad = client.post("/api/predict?ood_accept=0.97", files=files)
        report = client.get(f"/api/analyses/{moved['id']}/report.csv").text
        listed = {a["id"]: a["model"]["ood_accept"] for a in client.get("/api/analyses").json()["data"]}
    assert info["ood_accept"] is None and info["ood_accept_levels"] == list(OOD_ACCEPT_LEVELS)
    assert [it["abstain"] for it in moved["items"]] == loose.abstain.tolist()
    assert [it["abstain"] for it in plain["items"]] == strict.abstain.tolist()
    assert (moved["model"]["ood_accept"], plain["model"]["ood_accept"]) == (0.99, None)
    assert listed == {moved["id"]: 0.99, plain["id"]: None}
    assert {row["ood_accept"] for row in csv.DictReader(io.StringIO(report))} == {"0.99"}
    assert bad.status_code == 422 and "0.8, 0.9, 0.95, 0.975, 0.99" in bad.json()["detail"]


def test_the_batcher_answers_each_caller_at_its_own_operating_point(answers, lisc_files):
    """Requests at different operating points waiting together get their own answers; the
    served bundle itself is not moved."""
    import asyncio

    from hematoscope.data.images import load_model_image
    from hematoscope.serve.batching import ModelBatcher

    strict, loose = answers
    bundle = load_bundle("default")
    images = [load_model_image(f, bundle.preprocess) for f in lisc_files]
    names = [f.name for f in lisc_files]

    async def both():
        batcher = ModelBatcher(bundle, max_batch=4 * len(images), max_wait_s=0.5)
        await batcher.start()
        try:
            return await asyncio.gather(batcher.predict(images, names, 0.99), batcher.predict(images, names),
                                        batcher.predict(images[:3], names[:3], 0.99)), batcher.stats
        finally:
            await batcher.stop()

    (moved, plain, few), stats = asyncio.run(both())
    np.testing.assert_array_equal(moved.abstain, loose.abstain)
    np.testing.assert_array_equal(plain.abstain, strict.abstain)
    np.testing.assert_array_equal(few.abstain, loose.abstain[:3])
    assert stats.jobs == 3 and stats.batches == 2  # one model call per operating point
    assert bundle.config.ood_accept is None
    copy = bundle.at_ood_accept(0.99)
    assert copy.runner is bundle.runner and copy.config.ood_accept == 0.99 and bundle.config.ood_accept is None
