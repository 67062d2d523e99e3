"""``hematoscope predict`` end to end on a real (tiny) bundle."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hematoscope.cli.main import app


@pytest.fixture
def runner():
    return CliRunner()


def test_predict_folder_and_zip_with_bad_files(runner, tiny_neural_bundle, messy_folder, messy_zip, tmp_path):
    out = tmp_path / "preds.json"
    res = runner.invoke(app, ["predict", "--model", str(tiny_neural_bundle), str(messy_folder), str(messy_zip),
                              str(messy_folder / "notes.txt"), "--out", str(out), "--top-k", "2",
                              "--workers", "2", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert len(data["predictions"]) == 12
    assert set(data["predictions"][0]) >= {"source", "prediction", "top2_prob", "abstain"}
    reasons = {s["source"]: s["reason"] for s in data["skipped"]}
    assert len(reasons) == 7  # 3 bad files in the folder, the same 3 in the zip, the named notes.txt
    assert reasons[f"{messy_zip}!a/empty.png"] == "empty file"
    assert reasons[str(messy_folder / "notes.txt")] == "not an image or unknown format"
    assert data["differential"]["classified"] + data["differential"]["abstained"] == 12
    assert "Differential count" in res.output and "truncated file" in res.output
    # notes.txt inside the folder and the zip was passed over; the user hears of it (named, it was tried)
    assert "2 files in the folders or zips were left out" in " ".join(res.output.split())


def test_abstain_below_and_table_output(runner, tiny_neural_bundle, messy_folder):
    res = runner.invoke(app, ["predict", "-m", str(tiny_neural_bundle), str(messy_folder / "a"),
                              "--abstain-below", "1.0"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert res.output.count("abstained (low confidence)") == 3  # every image: nothing reaches p = 1
    assert "low confidence: 3" in res.output


def test_exit_codes(runner, tiny_neural_bundle, messy_folder, tmp_path, monkeypatch):
    res = runner.invoke(app, ["predict", "-m", str(tiny_neural_bundle), str(messy_folder / "a" / "empty.png")])
    assert res.exit_code == 1 and "empty file" in res.output
    evil = tmp_path / "evil.zip"
    import zipfile

    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../evil.jpg", b"x")
    res = runner.invoke(app, ["predict", "-m", str(tiny_neural_bundle), str(evil)], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "path traversal" in res.output  # reported; nothing else to classify
    import hematoscope.bundle.default as default

    monkeypatch.setattr(default, "DEFAULT_MODEL_DIR", tmp_path / "nowhere")
    res = runner.invoke(app, ["predict", str(messy_folder)])
    assert res.exit_code == 2 and "--model" in res.output


def test_the_other_lab_note_suggests_only_what_the_run_has_not_tried():
    from hematoscope import load_bundle
    from hematoscope.cli.predict import _lab_hint

    default = load_bundle("default")
    plain = _lab_hint(default, None, 0.4, framing_chosen=False)
    assert "try --framing auto or --recolour, or adapt" in plain and "hematoscope adapt default FOLDER" in plain
    assert "try --recolour, or adapt" in _lab_hint(default, None, 0.4, framing_chosen=True)
    default.set_recolour()
    assert "try" not in _lab_hint(default, "mine", 0.4, framing_chosen=True).split("crops")[1]
    default.config.adaptation = {"source": "lab-a", "adapted_from": "v4"}
    adapted = _lab_hint(default, None, 0.4, framing_chosen=False)
    assert "unlike the crops of 'lab-a'" in adapted and "original model (v4)" in adapted
    assert "--framing auto" not in adapted and "hematoscope adapt default" not in adapted


def test_a_mistyped_folder_is_said_in_one_line_and_writes_nothing(runner, tiny_neural_bundle, tmp_path):
    res = runner.invoke(app, ["predict", "-m", str(tiny_neural_bundle), str(tmp_path / "tset"),
                              "--out", str(tmp_path / "p.csv")], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "nothing to classify" in res.output and "tset: file not found" in res.output
    assert "Differential" not in res.output and "Predictions" not in res.output and not list(tmp_path.iterdir())


def test_results_record_the_framing_and_colour_changes_of_the_run(runner, tmp_path):
    """A row's framing is relative to the run's: the run's own (chosen by --framing auto or given)
    and the colour changes tried are in the results file's model block."""
    import json

    from hematoscope.bundle.default import DEFAULT_MODEL_DIR
    from hematoscope.samples import sample_paths

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the package has no default model")
    res = runner.invoke(app, ["predict", *map(str, sample_paths()[:4]), "--framing", "0.85", "--recolour",
                              "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    model = json.loads((tmp_path / "r.json").read_text())["model"]
    assert model["framing"] == 0.85 and ["saturation", 1.5] in model["framing_search"]["recolour"]
    # each view count's flag threshold, to read a row's ood_score against
    from hematoscope import load_bundle

    assert model["ood_limits"]["1"] == pytest.approx(load_bundle("default").trust_for(1).ood_threshold)
    rows = json.loads((tmp_path / "r.json").read_text())["predictions"]
    assert all(r["ood_flag"] == (r["ood_score"] > model["ood_limits"][str(r["views"])]) for r in rows)


def test_the_backend_comes_from_the_environment_unless_named(monkeypatch):
    """docs/predict.md: $HEMATOSCOPE_BACKEND forces a backend; --backend still wins."""
    from hematoscope.predict.options import InferenceOptions
    from hematoscope.samples import sample_paths

    used = []
    apply = InferenceOptions.apply
    monkeypatch.setattr(InferenceOptions, "apply",
                        lambda self, b, **kw: (used.append(self.backend), apply(self, b, **kw))[1])
    one = str(sample_paths()[0])
    monkeypatch.setenv("HEMATOSCOPE_BACKEND", "torch")
    assert CliRunner().invoke(app, ["predict", one, "--tta", "1"]).exit_code == 0
    assert CliRunner().invoke(app, ["predict", one, "--tta", "1", "--backend", "auto"]).exit_code == 0
    assert used == ["torch", "auto"]
    monkeypatch.setenv("HEMATOSCOPE_BACKEND", "tensorrt")
    res = CliRunner().invoke(app, ["predict", one])
    assert res.exit_code != 0 and "from HEMATOSCOPE_BACKEND" in " ".join(res.output.split())


def test_a_manifest_or_a_ray_option_given_to_the_local_engine_says_where_it_belongs(tmp_path):
    from hematoscope.samples import sample_paths

    manifest = tmp_path / "slides.csv"
    manifest.write_text("path\n" + "\n".join(str(p) for p in sample_paths()[:2]) + "\n")
    res = CliRunner().invoke(app, ["predict", str(manifest)])
    assert res.exit_code == 2 and "--engine ray" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["predict", str(sample_paths()[0]), "--shard-rows", "5"])
    assert res.exit_code == 2 and "go with --engine ray" in " ".join(res.output.split())
