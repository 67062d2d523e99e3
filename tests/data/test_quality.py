import hashlib
import json
import shutil
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hematoscope.cli.main import app
from hematoscope.data.quality import check_dataset
from hematoscope.data.readers import read_dataset
from hematoscope.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """3 synthetic classes with planted problems: a byte copy inside a class, a byte copy in
    another class, a re-encoded near copy, an empty file, a text file and a truncated PNG."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("planted"), classes=["a", "b", "c"], n_per_class=6, size=48)
    shutil.copy(root / "a/a_0000.png", root / "a/copy_of_a0.png")
    shutil.copy(root / "a/a_0001.png", root / "b/stolen_a1.png")
    arr = np.asarray(Image.open(root / "c/c_0002.png")).astype(int)
    Image.fromarray(np.clip(arr + 3, 0, 255).astype(np.uint8)).save(root / "c/c_0002_brighter.png")
    (root / "a/empty.png").write_bytes(b"")
    (root / "b/notes.jpg").write_text("not an image")
    (root / "c/cut.png").write_bytes((root / "c/c_0003.png").read_bytes()[:300])
    return root


def test_planted_problems_are_found(planted):
    report = check_dataset(planted, workers=1, progress=False)
    assert report.n_files == 6 * 3 + 6
    assert report.class_counts == {"a": 7, "b": 7, "c": 7}  # readable images: one unreadable file in each class
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in report.unreadable}
    assert reasons == {"empty.png": "empty file", "notes.jpg": "not an image or unknown format", "cut.png": "truncated file"}
    exact = {tuple(sorted(p.rsplit("/", 1)[1] for p in d["paths"])): d["cross_class"] for d in report.exact_duplicates}
    assert exact == {("a_0000.png", "copy_of_a0.png"): False, ("a_0001.png", "stolen_a1.png"): True}
    near = {tuple(sorted(p.rsplit("/", 1)[1] for p in (d["a"], d["b"]))) for d in report.near_duplicates}
    assert ("c_0002.png", "c_0002_brighter.png") in near
    assert report.cross_class_duplicates[0]["labels"] == ["a", "b"]
    assert report.formats == {"PNG": 21} and report.modes == {"RGB": 21} and report.sizes == {"48x48": 21}
    assert report.imbalance_ratio == 1.0


def test_class_counts_and_imbalance_are_of_readable_images(tmp_path):
    """Unreadable files are listed on their own, not counted as images of their class."""
    root = make_synthetic_dataset(tmp_path / "d", classes=["a", "b", "c"], n_per_class=4, size=16)
    (root / "a" / ".DS_Store.jpg").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    (root / "a" / "cut.png").write_bytes((root / "a" / "a_0000.png").read_bytes()[:60])
    for f in (root / "c").iterdir():  # a class with no readable image at all
        f.write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (1, 1), (200, 200, 200)).save(root / "b" / "dot.png")  # decodes, but no model takes it
    report = check_dataset(root, workers=1, progress=False)
    assert report.n_files == 15 and len(report.unreadable) == 7
    assert report.class_counts == {"a": 4, "b": 4, "c": 0} and report.imbalance_ratio == 1.0
    assert any(u["path"].endswith("dot.png") and "too small (1x1" in u["reason"] for u in report.unreadable)
    res = CliRunner().invoke(app, ["data", "check", str(root), "--workers", "1"])
    assert res.exit_code == 0 and "readable images per class" in res.output


def test_pool_and_inline_agree_and_report_is_json(planted):
    table = read_dataset(planted)
    big = table.loc[np.repeat(table.index, 10)].reset_index(drop=True)  # > 200 rows: uses the pool
    pooled = check_dataset(big, workers=2, progress=False).to_dict()
    inline = check_dataset(big, workers=1, progress=False).to_dict()
    for key in ("unreadable", "exact_duplicates", "near_duplicates", "class_counts", "sizes"):
        assert pooled[key] == inline[key]
    assert json.loads(json.dumps(pooled))["summary"]["files"] == 240


def test_unmapped_labels_are_reported(planted):
    assert check_dataset(planted, workers=1, progress=False).unmapped_labels == {"folder": {"a": 8, "b": 8, "c": 8}}


def test_real_pbc_subset(pbc_subset):
    report = check_dataset(pbc_subset, workers=1, progress=False)
    assert report.n_files == 48 and not report.unreadable and report.reader == "pbc"
    assert report.formats == {"JPEG": 48} and report.unmapped_labels == {}


def test_cli_check_writes_json(planted, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["data", "check", str(planted), "--json", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "unreadable files (3)" in res.output and "stolen_a1.png" in res.output
    data = json.loads(out.read_text())
    assert data["summary"]["unreadable"] == 3 and data["summary"]["cross_class_duplicates"] == 1


@pytest.mark.slow
def test_full_real_pbc(pbc_root):
    report = check_dataset(pbc_root, workers=2, progress=False)
    assert report.n_files == 13_726 and len(report.class_counts) == 8
    assert [(u["path"].rsplit("/", 2)[-2:], u["reason"]) for u in report.unreadable] == [
        (["neutrophil", ".DS_169665.jpg"], "not an image or unknown format")]
    # Byte-identical pairs, counted independently of the report.
    hashes = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in pbc_root.glob("*/*") if p.is_file())
    assert report.n_duplicate_pairs == sum(n * (n - 1) // 2 for n in hashes.values())
    cross = [sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[1] for p in d["paths"])
             for d in report.exact_duplicates if d["cross_class"]]
    assert ["eosinophil/EO_225902.jpg", "neutrophil/BNE_191112.jpg"] in cross


def test_many_identical_looking_images_stay_fast(tmp_path):
    """Images of one pattern at different sizes share one phash: one big bucket, compared blockwise."""
    from PIL import ImageDraw

    (tmp_path / "x").mkdir()
    for i in range(300):
        w, h = 20 + i % 20, 20 + i // 20
        im = Image.new("RGB", (w, h), (240, 240, 240))
        ImageDraw.Draw(im).rectangle((w // 3, h // 3, 2 * w // 3, 2 * h // 3), fill=(100, 60, 160))
        im.save(tmp_path / "x" / f"{i}.png")
    report = check_dataset(tmp_path, workers=1, progress=False)
    assert report.n_files == 300 and not report.exact_duplicates and not report.blank
    import imagehash  # the blockwise search finds what comparing every pair finds

    hashes = [imagehash.phash(Image.open(tmp_path / "x" / f"{i}.png").convert("RGB")) for i in range(300)]
    close = sum(hashes[i] - hashes[j] <= report.near_threshold for i in range(300) for j in range(i + 1, 300))
    assert len(report.near_duplicates) == close > 10_000  # a big bucket of look-alikes


def test_blank_frames_are_listed_as_blank_not_as_near_duplicates(tmp_path, pbc_subset):
    """A blank white and a blank black frame were reported as a near-duplicate pair across classes."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(pbc_subset, data)
    Image.new("RGB", (64, 64), (250, 250, 250)).save(data / "basophil" / "white.png")
    Image.new("RGB", (60, 60), (3, 3, 3)).save(data / "neutrophil" / "black.jpg")
    report = check_dataset(data, workers=1, progress=False)
    assert sorted(Path(p).name for p in report.blank) == ["black.jpg", "white.png"]  # no real cell among them
    assert not any({Path(d["a"]).name, Path(d["b"]).name} & {"white.png", "black.jpg"} for d in report.near_duplicates)
    Image.open(data / "basophil" / sorted(p.name for p in (data / "basophil").glob("*.jpg"))[0]).save(
        data / "neutrophil" / "relabelled.png")  # one image re-saved under another label: a near pair
    res = CliRunner().invoke(app, ["data", "check", str(data), "--workers", "1"])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "2 nearly uniform images" in said
    assert "across classes │ 0 exact groups, 1 near pair" in said  # groups and pairs counted apart


def test_crops_cut_past_their_slide_image_are_listed(lisc_root, tmp_path):
    """Black bars along an edge (LISC crops cut at the slide image's border) are reported; the
    crops without bars are not."""
    names = ["lisc_bas_0.jpg", "lisc_bas_1.jpg", "lisc_bas_134.jpg", "lisc_bas_135.jpg"]
    (tmp_path / "basophil").mkdir()
    for n in names:
        (tmp_path / "basophil" / n).symlink_to(lisc_root / "basophil" / n)
    report = check_dataset(tmp_path, workers=1, progress=False)
    assert sorted(p.rsplit("/", 1)[1] for p in report.edge_bars) == ["lisc_bas_134.jpg", "lisc_bas_135.jpg"]
    assert report.to_dict()["summary"]["edge_bars"] == 2
    res = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--workers", "1"])
    assert res.exit_code == 0 and "2 crops with black bars along an edge" in res.output


def test_real_pbc_cells_have_no_edge_bars(pbc_subset):
    assert check_dataset(pbc_subset, workers=1, progress=False).edge_bars == []
