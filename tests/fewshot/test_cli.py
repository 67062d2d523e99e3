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


def test_fewshot_fit_takes_a_labs_unlabelled_crops_and_flags_without_a_validation_part(small_synthetic, tmp_path):
    """All 4 labelled images per class are drawn: nothing is left for validation, the flag is
    cross-fitted; --unlabelled folders feed the self-training head, a missing path is reported."""
    from hematoscope.bundle import load_bundle
    from hematoscope.data.synthetic import make_synthetic_dataset

    crops = make_synthetic_dataset(tmp_path / "lab", n_per_class=2, size=32, seed=7)
    out = " ".join(_run(["fewshot", "fit", small_synthetic, "--head", "lr+self", "--size", 32,
                         "--unlabelled", crops, "--unlabelled", tmp_path / "missing", "--out", tmp_path / "b"]).split())
    assert "missing: file not found" in out and "self-trained on 16 images without labels" in out
    assert "cross-fitted on the 32 labelled images" in out
    bundle = load_bundle(tmp_path / "b")
    assert bundle.config.ood is not None and bundle.config.training.n_unlabelled == 16
    noise = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    assert bundle.predict(noise).abstain.all()


def test_fewshot_defaults_are_the_recipe_and_options_reach_the_library(small_synthetic, synthetic_root, tmp_path):
    """bench: svm+self, 8 views, ONNX Runtime, a 400-per-class pool, grouping when patient ids exist."""
    _run(["fewshot", "bench", small_synthetic, "--size", 32, "--shots", "1", "--repeats", 1,
          "--json", tmp_path / "r.json"])
    res = json.loads((tmp_path / "r.json").read_text())
    assert [r["head"] for r in res["results"]] == ["svm+self"] and res["views"] == 8
    assert res["backend"] == "onnx" and res["max_pool_per_class"] == 400 and res["group_by"] is None
    # a CSV with patient ids: grouped automatically; options override the recipe
    files = sorted(p for p in synthetic_root.rglob("*.png"))  # 12 per class: 6 cells of 2 crops
    table = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files],
                          "patient": [f"{p.parent.name}-{i // 2}" for i, p in enumerate(files)]})
    table.to_csv(tmp_path / "cells.csv", index=False)
    out = _run(["fewshot", "bench", tmp_path / "cells.csv", "--size", 32, "--shots", "1", "--repeats", 2,
                "--heads", "lr", "--views", 2, "--backend", "torch", "--pool-per-class", 0, "--jobs", 1,
                "--json", tmp_path / "g.json"])
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["group_by"] == "patient" and g["views"] == 2 and g["backend"] == "torch"
    assert g["max_pool_per_class"] is None and "grouped by patient" in " ".join(out.split())
    assert g["n_test"] % 2 == 0 and g["n_pool_groups"] * 2 == g["n_pool"]  # whole cells on each side
    off = _run(["fewshot", "bench", tmp_path / "cells.csv", "--size", 32, "--shots", "1", "--repeats", 1,
                "--heads", "knn", "--no-tta", "--group-by", "none", "--json", tmp_path / "n.json"])
    assert json.loads((tmp_path / "n.json").read_text())["group_by"] is None and "1 view," in off
    _run(["fewshot", "fit", tmp_path / "cells.csv", "-n", 1, "--size", 32, "--views", 4, "--unlabelled-per-class", 1,
          "--out", tmp_path / "b"])
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["model"]["head"]["self_training"] == 0.9 and cfg["model"]["views"] == 4
    assert cfg["training"]["group_by"] == "patient"


def test_fewshot_fit_on_a_split_file_never_sees_its_test_rows(synthetic_root, tmp_path, monkeypatch):
    """As `fewshot bench` and `classical train`: a split file gives its train + val rows; its test
    rows are neither drawn nor self-trained on (not even embedded), also when the same files come
    back through an --unlabelled folder, or when --unlabelled is a split file; the output says so."""
    import os

    from hematoscope.bundle import load_bundle
    from hematoscope.data.splits import load_split
    from hematoscope.fewshot.features import FeatureExtractor

    files = sorted(synthetic_root.rglob("*.png"))  # 12 per class: 6 cells of 2 crops
    pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files],
                  "patient": [f"{p.parent.name}-{i // 2}" for i, p in enumerate(files)]}).to_csv(tmp_path / "cells.csv",
                                                                                                 index=False)
    _run(["data", "split", tmp_path / "cells.csv", "--test", 0.25, "--group-by", "patient", "--out", tmp_path / "s.csv"])
    split = load_split(tmp_path / "s.csv")
    test = {os.path.abspath(p) for p in split.loc[split["split"] == "test", "path"]}
    assert test
    seen: set[str] = set()
    extract = FeatureExtractor.extract

    def recording(self, paths, **kw):
        seen.update(os.path.abspath(str(p)) for p in paths)
        return extract(self, paths, **kw)

    monkeypatch.setattr(FeatureExtractor, "extract", recording)
    common = ["-n", 2, "--head", "lr+self", "--size", 32, "--views", 1, "--backend", "torch"]
    from hematoscope.data.synthetic import make_synthetic_dataset

    lab = make_synthetic_dataset(tmp_path / "lab", n_per_class=1, size=32, seed=9)  # 8 crops of the lab's own
    out = " ".join(_run(["fewshot", "fit", tmp_path / "s.csv", *common, "--unlabelled", synthetic_root,
                         "--unlabelled", lab, "--out", tmp_path / "b"]).split())
    assert seen and not seen & test
    assert (f"train + val rows of {tmp_path / 's.csv'} used; {len(test)} test rows left out (neither drawn nor "
            f"self-trained on); also {len(test)} images sharing a file or group with them") in out
    # the lab's crops; the split's own train + val files, passed again, are not a second copy
    assert load_bundle(tmp_path / "b").config.training.n_unlabelled == 8
    # a split file as --unlabelled: its test rows are left out too
    split[split["split"] != "test"].drop(columns="split").to_csv(tmp_path / "pool.csv", index=False)
    seen.clear()
    out = " ".join(_run(["fewshot", "fit", tmp_path / "pool.csv", *common, "--unlabelled", tmp_path / "s.csv",
                         "--out", tmp_path / "c"]).split())
    assert seen and not seen & test and f"{len(test)} test rows left out" in out


def test_fewshot_fit_on_the_default_model(small_synthetic, tmp_path):
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the package has no default model")
    out = _run(["fewshot", "fit", small_synthetic, "--backbone", "default", "-n", 2, "--head", "lr",
                "--out", tmp_path / "b"])
    shipped = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    # the recipe's 8 views, not the shipped model's own 1 (with its cascade)
    assert cfg["model"]["backbone"]["type"] == "bundle" and cfg["model"]["views"] == 8 != shipped["tta"]
    assert cfg["preprocess"] == shipped["preprocess"] and "8 views" in out
    assert (tmp_path / "b" / "backbone" / "model.onnx").is_file()


def test_bad_input_exits_cleanly(tmp_path):
    r = CliRunner().invoke(app, ["fewshot", "fit", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["fewshot", "bench", str(tmp_path), "--shots", "0"])
    assert r.exit_code == 2 and "positive integers" in r.output
    r = CliRunner().invoke(app, ["fewshot", "bench", str(tmp_path), "--views", "3"])
    assert r.exit_code == 2 and "views" in r.output


@pytest.mark.slow  # umap-learn compiles its numba kernels on first use (~20 s)
def test_embed_writes_png_and_coordinates(small_synthetic, tmp_path):
    _run(["embed", small_synthetic, small_synthetic, "--size", 32, "--out", tmp_path / "u.png"])
    coords = pd.read_csv(tmp_path / "u.csv")
    assert len(coords) == 64 and np.isfinite(coords[["x", "y"]].to_numpy()).all()
    assert set(coords["class"]) == {p.name if p.name != "ig" else "immature_granulocyte"
                                    for p in small_synthetic.iterdir()}
    assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"


def test_ssl_refuses_to_replace_weights_or_name_them_as_a_pickle(small_synthetic, tmp_path):
    """Pretraining takes minutes to hours: an existing --out is kept unless --overwrite; a .pt
    name would later be read as a torch pickle, which the weights are not."""
    kept = tmp_path / "w.safetensors"
    kept.write_bytes(b"earlier pretraining")
    for out, message in ((kept, "--overwrite"), (tmp_path / "w.pt", "*.safetensors")):
        r = CliRunner().invoke(app, ["ssl", str(small_synthetic), "--max-steps", "1", "--out", str(out)])
        assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output  # refused before training
    assert kept.read_bytes() == b"earlier pretraining" and not (tmp_path / "w.pt").exists()


@pytest.mark.slow
def test_ssl_command_writes_usable_weights(small_synthetic, tiny_arch, tmp_path):
    out = _run(["ssl", small_synthetic, "--arch", tiny_arch, "--size", 32, "--batch-size", 12, "--max-steps", 6,
                "--minutes", 2, "--workers", 0, "--out", tmp_path / "w.safetensors"])
    assert "6 steps" in out
    _run(["features", small_synthetic, "--backbone", tiny_arch, "--weights", tmp_path / "w.safetensors",
          "--size", 32, "--out", tmp_path / "f"])


def test_fewshot_fit_names_a_label_typo_and_counts_each_unlabelled_image_once(small_synthetic, tmp_path):
    """A lab's label 'basophill' would become a class of the head: said, with the class meant.
    A crop passed twice, or already in DATA, is self-trained on once."""
    from hematoscope.data.synthetic import make_synthetic_dataset

    files = sorted(small_synthetic.rglob("*.png"))
    labels = [p.parent.name for p in files]
    labels[0] = labels[0] + "l"  # 'basophill'
    pd.DataFrame({"path": [str(p) for p in files], "label": labels}).to_csv(tmp_path / "labels.csv", index=False)
    crops = make_synthetic_dataset(tmp_path / "lab", n_per_class=2, size=32, seed=7)
    r = CliRunner().invoke(app, ["fewshot", "fit", str(tmp_path / "labels.csv"), "--head", "lr+self", "--size", "32",
                                 "--unlabelled", str(crops), "--unlabelled", str(crops), "--unlabelled",
                                 str(small_synthetic), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert f"'{labels[0]}' (1 image; did you mean '{files[0].parent.name}'?)" in out
    assert "self-trained on 16 images without labels" in out  # the lab's 16 crops, once each


def test_evaluate_counts_the_images_a_fewshot_head_learnt_from(synthetic_root, tmp_path):
    """Scoring a head on the folder it was drawn from is not a test: evaluate says how many of the
    scored images the bundle learnt from or was calibrated on; on images kept aside it says nothing."""
    import shutil

    files = sorted(synthetic_root.rglob("*.png"))
    for i, f in enumerate(files):  # every other crop of each class is kept aside, as a lab would
        dest = tmp_path / ("fit" if i % 2 else "aside") / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    _run(["fewshot", "fit", tmp_path / "fit", "-n", 2, "--head", "lr", "--size", 32, "--out", tmp_path / "b"])
    from hematoscope.bundle import load_bundle

    seen = load_bundle(tmp_path / "b").config.seen_images
    assert len(seen) >= 16 and seen == sorted(seen)  # 2 labels per class, and any validation draw
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "b"), str(tmp_path / "fit"), "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert f"{len(seen)} of the" in " ".join(r.output.split()) and "not a test" in r.output
    assert json.loads((tmp_path / "e.json").read_text())["seen_by_bundle"] == len(seen)
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "b"), str(tmp_path / "aside")])
    assert r.exit_code == 0 and "not a test" not in r.output


def test_fewshot_fit_names_an_unreadable_label_and_why_it_cannot_validate(small_synthetic, tmp_path):
    """A drawn file that cannot be read costs its class a label: named, and counted in the short
    classes; with a 1-image class nothing is left to validate on, and the message says which."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_synthetic, data)
    first, second = sorted(p for p in data.iterdir())[:2]
    for extra in sorted(first.iterdir())[1:]:
        extra.unlink()
    (second / "broken.png").write_bytes(b"not an image")
    r = CliRunner().invoke(app, [str(a) for a in ["fewshot", "fit", data, "-n", 5, "--head", "lr", "--size", 32,
                                                  "--out", tmp_path / "b"]])
    assert r.exit_code == 0, r.output
    out = " ".join((r.stdout + r.stderr).split())
    assert "1 drawn image(s) could not be read and were left out:" in out and "broken.png" in out
    assert f"{first.name} 1" in out and f"{second.name} 4" in out.split("classes with fewer labels")[1]
    assert f"too few labelled images left over to validate on ({first.name} 0" in out
