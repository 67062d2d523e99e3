"""The LISC reader on a tiny tree in its layout: class folders + groups.csv (path,label,group)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hematoscope.data.readers import DatasetError, detect_reader, get_reader, read_dataset
from hematoscope.data.samples import COLUMNS

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def _img(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def make_lisc(root: Path, cells_per_class: int = 4, crops_per_cell: int = 3, ungrouped: int = 1) -> Path:
    """LISC layout: <class>/lisc_<abbr>_<i>.jpg, crops of one cell sharing a group in groups.csv;
    ``ungrouped`` extra crops per class are missing from groups.csv."""
    lines, seed = ["path,label,group"], 0
    for cls in CLASSES:
        abbr, i = cls[:3], 0
        for cell in range(cells_per_class):
            for _ in range(crops_per_cell):
                rel = f"{cls}/lisc_{abbr}_{i}.jpg"
                _img(root / rel, seed)
                lines.append(f"{rel},{cls},{abbr}{cell + 1:03d}")
                i, seed = i + 1, seed + 1
        for _ in range(ungrouped):
            _img(root / cls / f"lisc_{abbr}_{i}.jpg", seed)
            i, seed = i + 1, seed + 1
    (root / "groups.csv").write_text("\n".join(lines) + "\n")
    (root / "README.md").write_text("# LISC crops\n")
    return root


def test_lisc_is_detected_and_groups_fill_the_patient_column(tmp_path):
    root = make_lisc(tmp_path / "lisc")
    assert detect_reader(root) == "lisc"  # not bccd, whose class names it shares
    df = read_dataset(root)
    assert list(df.columns[:5]) == COLUMNS and len(df) == 5 * (4 * 3 + 1) and (df["dataset"] == "lisc").all()
    assert df["canonical"].tolist() == df["label"].tolist()  # the taxonomy maps every LISC label
    grouped = df[df["patient"].notna()]
    assert len(grouped) == 5 * 12 and grouped["patient"].nunique() == 5 * 4
    assert grouped.groupby("patient").size().eq(3).all()
    assert grouped.groupby("patient")["label"].nunique().eq(1).all()
    assert df["patient"].isna().sum() == 5  # crops not in groups.csv have no group
    assert not any(p.endswith(".csv") or p.endswith(".md") for p in df["path"])


def test_grouped_split_keeps_a_cells_crops_on_one_side(tmp_path):
    from hematoscope.cli.main import app

    root = make_lisc(tmp_path / "lisc", cells_per_class=6)
    out = tmp_path / "split.csv"
    r = CliRunner().invoke(app, ["data", "split", str(root), "--out", str(out), "--group-by", "patient",
                                 "--val", "0.2", "--test", "0.2"])
    assert r.exit_code == 0, r.output
    from hematoscope.data.splits import load_split

    df = load_split(out)
    sides = df[df["patient"].notna()].groupby("patient")["split"].nunique()
    assert sides.eq(1).all() and set(df["split"]) == {"train", "val", "test"}


def test_not_lisc_without_groups_file_and_bad_groups_file(tmp_path):
    root = make_lisc(tmp_path / "lisc")
    (root / "groups.csv").unlink()
    assert detect_reader(root) != "lisc"
    with pytest.raises(DatasetError, match="groups.csv"):
        get_reader("lisc")(root)
    (root / "groups.csv").write_text("file,label\nbasophil/lisc_bas_0.jpg,basophil\n")
    with pytest.raises(DatasetError, match="not a LISC"):
        get_reader("lisc")(root)



def test_a_lisc_copy_with_another_class_folder_keeps_its_groups(tmp_path):
    """An extra folder makes the tree no longer LISC's layout; the folder reader still reads groups.csv."""
    root = make_lisc(tmp_path / "lisc")
    _img(root / "smudge" / "s0.jpg", 99)
    assert detect_reader(root) == "folder"
    df = read_dataset(root)
    assert len(df) == 5 * 13 + 1 and (df["dataset"] == "folder").all()
    assert df["patient"].notna().sum() == 5 * 12 and df["patient"].nunique() == 5 * 4
    assert df.loc[df["label"] == "smudge", "patient"].isna().all()
    (root / "groups.csv").write_text("file,cell\nx,y\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_dataset(root)
