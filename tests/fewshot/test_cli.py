"""The commands: features (cached), embed, fewshot fit / bench, ssl."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hematoscope.cli.main import app


def _run(args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_features_writes_arrays_and_reruns_from_cache(small_synthetic, tmp_path):
    out = _run(["features", small_synthetic, "--size", 32, "--out", tmp_path / "f"])
    feats = np.load(tmp_path / "f" / "features.npy")
    index = pd.read_csv(tmp_path / "f" / "index.csv")
    assert feats.shape == (32, 1408) and len(index) == 32 and "32 computed" in " ".join(out.split())
    again = _run(["features", small_synthetic, "--size", 32, "--out", tmp_path / "g"])
    assert "0 computed, 32 from cache" in " ".join(again.split())
    np.testing.assert_array_equal(np.load(tmp_path / "g" / "features.npy"), feats)
    assert set(index["label"]) == {p.name for p in small_synthetic.iterdir()}


def test_fewshot_fit_and_bench(small_synthetic, tmp_path):
    out = _run(["fewshot", "fit", small_synthetic, "--labels-per-class", 2, "--head", "lr", "--size", 32,
                "--out", tmp_path / "b"])
    assert "fitted lr on 16 images" in " ".join(out.split())
    assert json.loads((tmp_path / "b" / "config.json").read_text())["kind"] == "fewshot"
    _run(["fewshot", "bench", small_synthetic, "--shots", "1,2", "--repeats", 2, "--heads", "lr,knn", "--size", 32,
          "--json", tmp_path / "r.json", "--plot", tmp_path / "c.png"])
    res = json.loads((tmp_path / "r.json").read_text())
    assert [(r["shots"], r["head"]) for r in res["results"]] == [(1, "lr"), (1, "knn"), (2, "lr"), (2, "knn")]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_exits_cleanly(tmp_path):
    r = CliRunner().invoke(app, ["fewshot", "fit", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["fewshot", "bench", str(tmp_path), "--shots", "0"])
    assert r.exit_code == 2 and "positive integers" in r.output


@pytest.mark.slow  # umap-learn compiles its numba kernels on first use (~20 s)
def test_embed_writes_png_and_coordinates(small_synthetic, tmp_path):
    _run(["embed", small_synthetic, small_synthetic, "--size", 32, "--out", tmp_path / "u.png"])
    coords = pd.read_csv(tmp_path / "u.csv")
    assert len(coords) == 64 and np.isfinite(coords[["x", "y"]].to_numpy()).all()
    assert set(coords["class"]) == {p.name if p.name != "ig" else "immature_granulocyte"
                                    for p in small_synthetic.iterdir()}
    assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_ssl_command_writes_usable_weights(small_synthetic, tiny_arch, tmp_path):
    out = _run(["ssl", small_synthetic, "--arch", tiny_arch, "--size", 32, "--batch-size", 12, "--max-steps", 6,
                "--minutes", 2, "--workers", 0, "--out", tmp_path / "w.safetensors"])
    assert "6 steps" in out
    _run(["features", small_synthetic, "--backbone", tiny_arch, "--weights", tmp_path / "w.safetensors",
          "--size", 32, "--out", tmp_path / "f"])
