"""Batch inference on Ray Data (the optional ``distributed`` extra), on one local 2-CPU Ray
instance shared by the tests of this module (127.0.0.1, no dashboard): the same rows as local
``predict``, broken files reported per row, a stopped job resumes after its first shard."""
from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hematoscope.bundle.prediction import Prediction
from hematoscope.cli.main import app
from hematoscope.samples import sample_paths

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module, started as the Ray engine starts one."""
    from hematoscope.predict.distributed import connect, local_session_dir, remove_session_dir

    assert connect(num_cpus=2)
    import ray

    session = local_session_dir()
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        yield ray
    finally:
        ray.shutdown()
        if session is not None:
            remove_session_dir(session)


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """The 24 bundled real PBC cells, a truncated JPEG, an empty PNG, a text file named .jpg and
    one named .txt."""
    root = tmp_path_factory.mktemp("cells") / "cells"
    for p in sample_paths():
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    first = sample_paths()[0].read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "truncated.jpg").write_bytes(first[:400])
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "broken" / "text.jpg").write_text("not an image")
    (root / "broken" / "notes.txt").write_text("not an image by its extension: passed over, and said so")
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _assert_same_rows(ray_rows: list[dict], local_rows: list[dict]) -> None:
    """Row for row the same text, probabilities included; the OOD score (a k-NN distance in
    numpy, whose BLAS runs one thread in a Ray worker and several here) to within 1e-5."""
    assert [r["source"] for r in ray_rows] == [r["source"] for r in local_rows]
    for a, b in zip(ray_rows, local_rows):
        assert a.keys() == b.keys()
        for key in a:
            if key == "ood_score" and a[key] and b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), a["source"]
            else:
                assert a[key] == b[key], (a["source"], key)


def test_ray_engine_gives_local_predicts_rows_and_reports_broken_files(ray_local, cells, tmp_path):
    runner = CliRunner()
    local = runner.invoke(app, ["predict", str(cells), "--out", str(tmp_path / "local.csv")])
    assert local.exit_code == 0, local.output
    res = runner.invoke(app, ["predict", str(cells), "--engine", "ray", "--out", str(tmp_path / "ray.csv")])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "24 images through the model" in said and "27 files read in this run" in said
    for run in (local, res):
        assert "1 file in the folders or zips was left out" in " ".join(run.output.split())

    ray_rows, local_rows = _rows(tmp_path / "ray.csv"), _rows(tmp_path / "local.csv")
    assert len(ray_rows) == 27
    _assert_same_rows(ray_rows, local_rows)
    errors = {Path(r["source"]).name: r["error"] for r in ray_rows if r["error"]}
    assert set(errors) == {"truncated.jpg", "empty.png", "text.jpg"}
    assert (tmp_path / "ray.differential.csv").read_text() == (tmp_path / "local.differential.csv").read_text()

    # the same job again, named by a relative path from another working directory: resumed, nothing run
    here = Path.cwd()
    try:
        os.chdir(cells.parent)
        again = runner.invoke(app, ["predict", cells.name, "--engine", "ray", "--out", str(tmp_path / "ray.csv")])
    finally:
        os.chdir(here)
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert "24 images through the model" in said and "0 files read in this run" in said and "/s" not in said

    # the Parquet shards hold the same answers, with every probability
    from hematoscope.predict.distributed import read_results

    table = read_results(tmp_path / "ray.shards").to_pydict()
    assert table["row"] == list(range(27))
    assert [Path(s).name for s, e in zip(table["source"], table["error"]) if e] == ["empty.png", "text.jpg",
                                                                                   "truncated.jpg"]
    ok = [i for i, e in enumerate(table["error"]) if e is None]
    probs = np.array([table["probs"][i] for i in ok])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert [table["prediction"][i] for i in ok] == [r["prediction"] for r in local_rows if not r["error"]]


def test_a_stopped_job_resumes_after_its_first_shard(ray_local, cells, tmp_path):
    from hematoscope.predict import predict_paths
    from hematoscope.predict.distributed import load_for_inference, run_job, shard_path

    class Stop(RuntimeError):
        pass

    def stop_after_first(shard, rows):
        raise Stop(f"stopped after shard {shard}")

    job = tmp_path / "job"
    with pytest.raises(Stop):
        run_job([str(cells)], job, shard_rows=16, batch_size=8, on_shard=stop_after_first)
    first = shard_path(job, 0)
    assert first.is_file() and not shard_path(job, 1).exists()
    stamp = first.stat().st_mtime_ns

    written = []
    result = run_job([str(cells)], job, shard_rows=16, batch_size=8, report=tmp_path / "resumed.json",
                     on_shard=lambda s, n: written.append(s))
    assert (result.shards, result.shards_skipped, result.shards_written) == (2, 1, 1)
    assert written == [1] and first.stat().st_mtime_ns == stamp  # shard 0 was not redone
    assert result.rows == 27 and result.differential.skipped == 3

    local = predict_paths(load_for_inference(None), [str(cells)])
    assert result.differential.to_dict() == local.differential().to_dict()
    import json

    rows = json.loads((tmp_path / "resumed.json").read_text())["predictions"]
    assert [r["source"] for r in rows] == local.sources
    assert [r["prediction"] for r in rows] == local.predicted

    with pytest.raises(ValueError, match="another job"):  # the job folder is not reused for other inputs
        run_job([str(cells / "basophil")], job, shard_rows=16)


def test_predict_dataset_classifies_a_users_ray_dataset_and_a_csv_manifest(ray_local, cells, tmp_path):
    from hematoscope.predict.distributed import InferenceOptions, load_for_inference, predict_dataset, run_job

    files = sorted(str(p) for p in cells.rglob("*.jpg") if p.parent.name != "broken")[:6]
    ds = ray_local.data.from_items([{"path": f, "slide": i} for i, f in enumerate(files)])
    out = predict_dataset(ds, options=InferenceOptions(tta=1), actors=1).to_pandas()
    bundle = load_for_inference(None, InferenceOptions(tta=1))
    local = bundle.predict(files)
    assert list(out["slide"]) == list(range(6))  # the user's columns come through
    assert list(out["prediction"]) == local.predicted
    np.testing.assert_allclose(np.stack(out["probs"]), local.probs, atol=1e-6)

    manifest = tmp_path / "paths.csv"
    manifest.write_text("path\n" + "\n".join(files[:3] + [str(tmp_path / "missing.jpg")]) + "\n")
    result = run_job([str(manifest)], tmp_path / "job", options=InferenceOptions(tta=1))
    assert result.rows == 4 and result.differential.classified + result.differential.abstained == 3
    assert [s.source for s in result.skipped] == [str(tmp_path / "missing.jpg")]


def test_ray_actors_use_the_framing_asked_for(ray_local, cells):
    from hematoscope.predict.distributed import InferenceOptions, load_for_inference, predict_dataset

    files = sorted(str(p) for p in cells.rglob("*.jpg") if p.parent.name != "broken")[:4]
    ds = ray_local.data.from_items([{"path": f} for f in files])
    out = predict_dataset(ds, options=InferenceOptions(tta=1, framing=1.5), actors=1).to_pandas()
    local = load_for_inference(None, InferenceOptions(tta=1, framing=1.5))
    assert local.preprocess.framing == 1.5
    framed = local.predict(files)
    np.testing.assert_allclose(np.stack(out["probs"]), framed.probs, atol=1e-6)
    np.testing.assert_allclose(out["ood_score"], framed.ood_score, atol=1e-6)
    # confident cells keep their answer when padded; how familiar they look shows the framing
    whole = load_for_inference(None, InferenceOptions(tta=1)).predict(files)
    assert np.abs(out["ood_score"].to_numpy() - whole.ood_score).max() > 0.1


def test_a_missing_extra_is_named(monkeypatch, tmp_path):
    from hematoscope.predict.distributed import MissingExtraError, require_distributed

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"hematoscope\[distributed\]"):
        require_distributed()
    res = CliRunner().invoke(app, ["predict", str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 2 and "hematoscope[distributed]" in res.output


def test_the_command_joins_a_running_cluster_at_address(ray_local, cells, tmp_path):
    """``--address``: a separate ``hematoscope`` process joins the running (local) cluster
    instead of starting its own, and leaves it running."""
    import subprocess

    address = ray_local.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    out = tmp_path / "joined.csv"
    proc = subprocess.run([str(Path(sys.executable).parent / "hematoscope"), "predict", str(cells / "basophil"),
                           "--engine", "ray", "--address", address, "--tta", "1", "--out", str(out),
                           "--shard-rows", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = " ".join(proc.stdout.split())
    assert "3 images through the model" in said and "2 shards written" in said and len(_rows(out)) == 3
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 2  # still up


def test_a_job_that_starts_its_own_instance_leaves_no_session_folder(cells, tmp_path):
    """Ray keeps a folder of logs and sockets per start in its temp folder for good; a finished
    job of the Ray engine removes the one of the instance it started."""
    import os
    import subprocess
    import tempfile

    # RAY_TMPDIR: this run's instance apart from the module's (short: Ray's socket paths must fit 107 bytes)
    ray_tmp = Path(tempfile.mkdtemp(prefix="hs-ray-"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    out = tmp_path / "own.csv"
    proc = subprocess.run([str(Path(sys.executable).parent / "hematoscope"), "predict", str(cells / "basophil"),
                           "--engine", "ray", "--tta", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_rows(out)) == 3
    try:
        assert (ray_tmp / "ray").is_dir()  # the instance did run from there
        assert not list(ray_tmp.rglob("session_2*")) and not (ray_tmp / "ray" / "session_latest").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_rows_keep_their_own_answers_whatever_their_names(tmp_path):
    """Rows are matched to answers by position: a zip member, a missing member, a file:// URI, a
    missing file and two rows sharing one source name with different outcomes."""
    import zipfile

    import pyarrow as pa

    from hematoscope.predict.distributed import InferenceOptions, classify_table, load_for_inference

    good = [str(p) for p in sample_paths()[:2]]
    zpath = tmp_path / "cells.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(good[0], "x/cell.jpg")
    table = pa.table({
        "path": [str(zpath), str(zpath), "file://" + good[1], str(tmp_path / "gone.jpg"), good[0], good[1]],
        "member": [None if i not in (0, 1) else m for i, m in enumerate(["x/missing.jpg", "x/cell.jpg"] + [None] * 4)],
        "source": ["same", "same", None, "gone", "twin", "twin"],
    })
    out = classify_table(load_for_inference(None, InferenceOptions(tta=1)), table).to_pydict()
    assert out["source"] == ["same", "same", None, "gone", "twin", "twin"]  # the user's names, untouched
    assert out["error"][0] == "not in the zip file" and out["prediction"][0] is None
    assert out["error"][1] is None and out["prediction"][1] is not None
    assert out["error"][2] is None and out["error"][3] and out["prediction"][3] is None
    local = load_for_inference(None, InferenceOptions(tta=1)).predict([good[0], good[1], good[0], good[1]])
    assert [out["prediction"][i] for i in (1, 2, 4, 5)] == local.predicted


def test_ray_jobs_search_colours_like_local_predict(ray_local, lisc_root, tmp_path):
    """``predict --engine ray --recolour``: actors run the colour search, its column reaches the
    shards and the report as local predict writes it."""
    from hematoscope.predict.distributed import InferenceOptions, iter_shard_predictions, load_for_inference, run_job

    files = [str(p) for p in sorted((lisc_root / "lymphocyte").glob("*.jpg"))[:8]]
    local = load_for_inference(None, InferenceOptions(tta=1, recolour=True)).predict(files)
    assert (local.recolour != "").any()
    result = run_job(files, tmp_path / "job", options=InferenceOptions(tta=1, recolour=True), report=tmp_path / "r.csv")
    shards = Prediction.concat(list(iter_shard_predictions(tmp_path / "job", local.labels)), local.labels)
    assert list(shards.recolour) == list(local.recolour)
    np.testing.assert_allclose(shards.probs, local.probs, atol=1e-6)
    assert [r["recolour"] for r in _rows(result.report)] == list(local.recolour)
    res = CliRunner().invoke(app, ["predict", *files[:2], "--engine", "ray", "--recolour", "--no-reframe",
                                   "--out", str(tmp_path / "x.csv")])
    assert res.exit_code != 0 and "cannot go with --no-reframe" in res.output


def test_a_job_is_not_resumed_with_other_options(ray_local, cells, tmp_path):
    from hematoscope.predict.distributed import InferenceOptions, run_job

    job = tmp_path / "job"
    run_job([str(cells / "basophil")], job, options=InferenceOptions(tta=1))
    with pytest.raises(ValueError, match="ood_accept differ"):  # its shards were answered with the fitted flag
        run_job([str(cells / "basophil")], job, options=InferenceOptions(tta=1, ood_accept=0.99))


def test_a_job_is_not_resumed_after_its_files_or_model_changed(ray_local, cells, tmp_path):
    """A job folder is matched on what its inputs and model hold, not on their names: a rerun
    after files were added, removed or replaced, or with another model at the same path, would
    otherwise return the old answers as if they were new."""
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR
    from hematoscope.predict.distributed import InferenceOptions, run_job

    folder, model = tmp_path / "slide", tmp_path / "model"
    shutil.copytree(cells / "basophil", folder)
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    options, job = InferenceOptions(tta=1), tmp_path / "job"
    first = run_job([str(folder)], job, model=model, options=options)
    again = run_job([str(folder)], job, model=model, options=options)  # unchanged: resumed, nothing redone
    assert again.shards_written == 0 and again.rows == first.rows
    shutil.copy(cells / "eosinophil" / sorted(p.name for p in (cells / "eosinophil").iterdir())[0],
                folder / "new.jpg")
    with pytest.raises(ValueError, match="input files"):
        run_job([str(folder)], job, model=model, options=options)
    (folder / "new.jpg").unlink()
    assert run_job([str(folder)], job, model=model, options=options).shards_written == 0
    metrics = model / "metrics.json"
    metrics.write_text(metrics.read_text().replace("{", '{"retrained": true, ', 1))
    with pytest.raises(ValueError, match="model files"):
        run_job([str(folder)], job, model=model, options=options)


def test_an_address_nothing_answers_at_is_refused_at_once():
    """Ray retries an unreachable cluster for minutes, printing 'Failed to connect to GCS'."""
    import socket
    import time

    from hematoscope.predict.distributed import RayJobError, connect

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(RayJobError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        connect(f"127.0.0.1:{port}")
    assert time.perf_counter() - start < 30
