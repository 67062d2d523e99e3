"""``hematoscope predict`` with awkward inputs: zips inside folders, hostile zips among good
files, empty folders, and file names that a spreadsheet would run as formulas."""
from __future__ import annotations

import csv
import json
import zipfile

import pytest
from typer.testing import CliRunner

from hematoscope.bundle.prediction import SkippedFile
from hematoscope.cli.main import app
from hematoscope.data.sources import ImageSource, expand_paths


@pytest.fixture
def folder_with_zips(tmp_path, messy_zip, images):
    """A folder holding one image, the messy zip (9 images), a hostile zip, a zip with no image,
    and a zip holding a zip."""
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    (root / "cell.jpg").write_bytes(images.encode(images.colour(0)))
    (root / "sub" / "cells.zip").write_bytes(messy_zip.read_bytes())
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        zf.writestr("ok.jpg", images.encode(images.colour(1)))
        zf.writestr("../../escape.jpg", b"payload")
    with zipfile.ZipFile(root / "notes.zip", "w") as zf:
        zf.writestr("readme.txt", "no images here")
    with zipfile.ZipFile(root / "nested.zip", "w") as zf:
        zf.writestr("inner.zip", (root / "sub" / "cells.zip").read_bytes())
        zf.writestr("x.png", images.encode(images.colour(2), "PNG"))
    return root


def test_zips_inside_a_folder_are_expanded_and_problems_reported(folder_with_zips):
    items = expand_paths([folder_with_zips])
    images = [i.name for i in items if isinstance(i, ImageSource)]
    skipped = {s.source: s.reason for s in items if isinstance(s, SkippedFile)}
    root = folder_with_zips
    assert str(root / "cell.jpg") in images
    assert f"{root / 'sub' / 'cells.zip'}!a/cell_0.jpg" in images
    assert f"{root / 'nested.zip'}!x.png" in images
    assert len(images) == 1 + 9 + 1
    assert skipped[str(root / "evil.zip")].startswith("unsafe zip, not read")
    assert "path traversal" in skipped[str(root / "evil.zip")]
    assert skipped[str(root / "notes.zip")] == "no image files in this zip"
    assert "zip inside a zip" in skipped[f"{root / 'nested.zip'}!inner.zip"]
    assert not any("evil.zip!" in n for n in images)


def test_an_empty_folder_is_reported(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert expand_paths([tmp_path / "empty"]) == [
        SkippedFile(str(tmp_path / "empty"), "no image files or zip files in this folder")]


def test_cli_classifies_the_rest_when_one_zip_is_hostile(tiny_neural_bundle, folder_with_zips, tmp_path):
    out = tmp_path / "preds.json"
    res = CliRunner().invoke(app, ["predict", "-m", str(tiny_neural_bundle), str(folder_with_zips), "--out", str(out),
                                   "--workers", "1"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert len(data["predictions"]) == 11 - 3  # the messy zip holds 3 bad files
    reasons = {s["source"]: s["reason"] for s in data["skipped"]}
    assert "path traversal" in reasons[str(folder_with_zips / "evil.zip")]
    assert reasons[str(folder_with_zips / "notes.zip")] == "no image files in this zip"
    assert "path traversal" in " ".join(res.output.split())


def test_safe_cell():
    from hematoscope._csv import safe_cell

    for value in ("=1+1", "+1", "-1", "@A1", "\t=1", "\r=1"):
        assert safe_cell(value) == "'" + value
    for value in ("plain", "", 1.5, -0.5, None, "a=b", "/abs/=x.jpg"):
        assert safe_cell(value) == value


def test_cli_csv_escapes_relative_formula_names(tiny_neural_bundle, tmp_path, images, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["=cmd|' calc'!A1.jpg", "+SUM(1).jpg", "-1+2.jpg", "@x.jpg", "plain.jpg"]
    for n in names:
        (tmp_path / n).write_bytes(images.encode(images.colour(0)))
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["predict", "-m", str(tiny_neural_bundle), "--out", str(out), "--", *names,
                                   "missing=1.jpg", "-1.jpg"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["source"] for r in rows] == ["'" + n for n in names[:4]] + ["plain.jpg", "missing=1.jpg", "'-1.jpg"]
    assert rows[-1]["error"] == "file not found"
    assert all(not r["prediction"].startswith(("=", "+", "-", "@")) for r in rows)
