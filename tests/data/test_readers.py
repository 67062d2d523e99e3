"""Each reader on a tiny tree in the dataset's exact published layout (PBC on the real images)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematoscope.data.images import load_image
from hematoscope.data.readers import DatasetError, detect_reader, list_readers, read_dataset
from hematoscope.data.samples import COLUMNS
from hematoscope.taxonomy import TAXONOMY, unmapped_labels

PBC_COUNTS = {"basophil": 980, "eosinophil": 2498, "erythroblast": 1245, "ig": 2345, "lymphocyte": 952,
              "monocyte": 1127, "neutrophil": 2683, "platelet": 1896}


def _img(path: Path, seed: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _check_table(df, dataset: str, n: int):
    assert list(df.columns[:5]) == COLUMNS
    assert len(df) == n and (df["dataset"] == dataset).all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert df["canonical"].notna().all(), unmapped_labels(df)


def test_all_builtin_readers_registered():
    assert set(list_readers()) >= {"folder", "csv", "pbc", "matek", "raabin", "cnmc", "bccd", "bloodmnist", "hida"}


def test_pbc_reader_on_real_images(pbc_root):
    df = read_dataset(pbc_root)  # auto-detected
    _check_table(df, "pbc", 13_726)
    assert df.groupby("label").size().to_dict() == PBC_COUNTS
    assert df.loc[df["label"] == "ig", "canonical"].eq("immature_granulocyte").all()
    subtypes = set(df.loc[df["label"] == "neutrophil", "subtype"].dropna())
    assert {"SNE", "BNE"} <= subtypes
    assert TAXONOMY.canonical(None, "SNE") == "neutrophil_segmented"


def test_pbc_reader_accepts_published_parent_folder(tmp_path):
    for i, cls in enumerate(["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]):
        _img(tmp_path / "PBC_dataset_normal_DIB" / cls / f"X_{i}.jpg", i)
    assert detect_reader(tmp_path) == "pbc"
    _check_table(read_dataset(tmp_path), "pbc", 8)


def test_matek_reader(tmp_path):
    root = tmp_path / "AML-Cytomorphology_LMU"
    abbrs = ["BAS", "EBO", "EOS", "KSC", "LYA", "LYT", "MMZ", "MOB", "MON", "MYB", "MYO", "NGB", "NGS", "PMB", "PMO"]
    for i, a in enumerate(abbrs):
        _img(root / a / f"{a}_{i:04d}.tiff", i)
    (root / "annotations.dat").write_text("file classification\n")
    assert detect_reader(tmp_path) == "matek"
    df = read_dataset(tmp_path)
    _check_table(df, "matek", 15)
    canon = dict(zip(df["label"], df["canonical"]))
    assert canon["NGS"] == "neutrophil_segmented" and canon["KSC"] == "smudge_cell"
    assert canon["PMB"] == "promyelocyte_bilobed" and canon["MYB"] == "myeloblast"
    assert TAXONOMY.match(canon["NGS"], ["neutrophil", "lymphocyte"]) == "neutrophil"
    assert TAXONOMY.match(canon["MMZ"], ["immature_granulocyte"]) == "immature_granulocyte"
    assert load_image(df["path"][0]).shape == (8, 8, 3)


def test_raabin_reader_keeps_subset(tmp_path):
    for s, sub in enumerate(["Train", "TestA"]):
        for c, cls in enumerate(["Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"]):
            _img(tmp_path / sub / cls / f"95-8-24-1_{c}_{s}.jpg", c)
    assert detect_reader(tmp_path) == "raabin"
    df = read_dataset(tmp_path)
    _check_table(df, "raabin", 10)
    assert df.groupby("subset").size().to_dict() == {"TestA": 5, "Train": 5}
    assert set(df["canonical"]) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}


def test_cnmc_reader_parses_patients(tmp_path):
    base = tmp_path / "C-NMC_Leukemia" / "training_data"
    _img(base / "fold_0" / "all" / "UID_11_10_1_all.bmp")
    _img(base / "fold_0" / "all" / "UID_11_12_3_all.bmp")
    _img(base / "fold_1" / "all" / "UID_45_1_1_all.bmp")
    _img(base / "fold_1" / "hem" / "UID_H10_43_1_hem.bmp")
    _img(base / "fold_2" / "hem" / "UID_H22_31_15_hem.bmp")
    assert detect_reader(tmp_path) == "cnmc"
    df = read_dataset(tmp_path)
    _check_table(df, "cnmc", 5)
    by_name = {Path(p).name: (pat, fold, canon) for p, pat, fold, canon in zip(df["path"], df["patient"], df["fold"], df["canonical"])}
    assert by_name["UID_11_10_1_all.bmp"] == ("11", "fold_0", "lymphoblast")
    assert by_name["UID_H10_43_1_hem.bmp"] == ("H10", "fold_1", "lymphocyte_normal")
    assert TAXONOMY.match("lymphocyte_normal", ["lymphocyte"]) == "lymphocyte"


def test_cnmc_grouped_split_never_shares_a_patient(tmp_path):
    from hematoscope.data.splits import make_split

    for p in range(12):
        for i in range(3):
            label = "all" if p % 2 else "hem"
            pid = str(p) if label == "all" else f"H{p}"
            _img(tmp_path / f"fold_{p % 3}" / label / f"UID_{pid}_{i}_1_{label}.bmp", p * 3 + i)
    df = make_split(read_dataset(tmp_path, reader="cnmc"), val=0.2, test=0.2, group_by="patient")
    assert (df.groupby("patient")["split"].nunique() == 1).all()
    assert df["patient"].nunique() == 12


@pytest.mark.parametrize("layout", ["flat", "kaggle"])
def test_bccd_reader(tmp_path, layout):
    classes = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
    subsets = [""] if layout == "flat" else ["dataset2-master/images/TRAIN", "dataset2-master/images/TEST"]
    for s in subsets:
        for c, cls in enumerate(classes):
            _img(tmp_path / s / cls / f"_0_{c}.jpeg", c)
    assert detect_reader(tmp_path) == "bccd"
    df = read_dataset(tmp_path)
    _check_table(df, "bccd", 4 * len(subsets))
    if layout == "kaggle":
        assert set(df["subset"]) == {"TRAIN", "TEST"}
    assert set(df["canonical"]) == {"eosinophil", "lymphocyte", "monocyte", "neutrophil"}


@pytest.mark.parametrize("size,channels", [(28, 3), (64, 0)])
def test_bloodmnist_reader_materialises_pngs(tmp_path, size, channels):
    rng = np.random.default_rng(0)
    arrays = {}
    for subset, n in (("train", 8), ("val", 3), ("test", 2)):
        shape = (n, size, size, 3) if channels else (n, size, size)
        arrays[f"{subset}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{subset}_labels"] = (np.arange(n) % 8).reshape(-1, 1)
    npz = tmp_path / ("bloodmnist.npz" if size == 28 else f"bloodmnist_{size}.npz")
    np.savez(npz, **arrays)
    assert detect_reader(npz) == "bloodmnist" and detect_reader(tmp_path) == "bloodmnist"
    df = read_dataset(npz)
    _check_table(df, "bloodmnist", 13)
    assert df.groupby("subset").size().to_dict() == {"test": 2, "train": 8, "val": 3}
    first = df[(df["subset"] == "train") & (df["label"] == "ig")].iloc[0]
    assert first["canonical"] == "immature_granulocyte"
    img = load_image(first["path"])
    expected = arrays["train_images"][3]
    assert np.array_equal(img, expected if channels else np.repeat(expected[:, :, None], 3, axis=2))
    again = read_dataset(npz)  # cached: same paths, no rewrite
    assert again["path"].tolist() == df["path"].tolist()


def test_bloodmnist_rejects_bad_archive(tmp_path):
    np.savez(tmp_path / "bloodmnist.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="missing arrays"):
        read_dataset(tmp_path / "bloodmnist.npz")


def test_hida_reader(tmp_path):
    classes = ["basophil", "eosinophil", "erythroblast", "myeloblast", "promyelocyte", "myelocyte", "metamyelocyte",
               "neutrophil_banded", "neutrophil_segmented", "monocyte", "lymphocyte_typical"]
    for i, cls in enumerate(classes):
        _img(tmp_path / "Acevedo_20" / cls / f"{cls[:3].upper()}_{i}.jpg", i)
        _img(tmp_path / "Matek_19" / cls / f"{cls[:3].upper()}_{i:04d}.tiff", i)
    _img(tmp_path / "WBC1" / "DATA-VAL" / "1.TIF")
    assert detect_reader(tmp_path) == "hida"
    df = read_dataset(tmp_path)
    _check_table(df, "hida", 22)
    assert set(df["source"]) == {"Acevedo_20", "Matek_19"}
    assert df.loc[df["label"] == "neutrophil_banded", "canonical"].eq("neutrophil_band").all()


def test_csv_reader_resolves_relative_paths(tmp_path):
    a = _img(tmp_path / "imgs" / "a.png")
    b = _img(tmp_path / "imgs" / "b.png", 1)
    (tmp_path / "labels.csv").write_text(f"path,label,patient,stain\nimgs/a.png,Neutrophil,p1,MGG\n{b},LYT,,MGG\n")
    df = read_dataset(tmp_path / "labels.csv")
    _check_table(df, "csv", 2)
    assert df["path"].tolist() == [str(a), str(b)]
    assert df["canonical"].tolist() == ["neutrophil", "lymphocyte_typical"]
    assert df["patient"].tolist() == ["p1", None] and (df["stain"] == "MGG").all()


def test_csv_reader_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_dataset(tmp_path / "bad.csv")


def test_unknown_labels_are_kept_and_reported(tmp_path):
    _img(tmp_path / "neutrophil" / "a.png")
    _img(tmp_path / "artefact" / "b.png")
    _img(tmp_path / "artefact" / "c.png")
    df = read_dataset(tmp_path)
    assert len(df) == 3
    assert unmapped_labels(df) == {"folder": {"artefact": 2}}


def test_errors_for_missing_or_wrong_layout(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown reader"):
        read_dataset(tmp_path, reader="nope")
    (tmp_path / "empty").mkdir()
    for reader in ("folder", "pbc", "matek", "raabin", "cnmc", "bccd", "hida", "bloodmnist"):
        with pytest.raises(DatasetError):
            read_dataset(tmp_path / "empty", reader=reader)


def test_a_labs_own_lower_case_white_cell_folders_are_not_taken_for_bccd(tmp_path):
    for c, cls in enumerate(["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]):
        _img(tmp_path / cls / f"cell_{c}.png", c)
    assert detect_reader(tmp_path) == "folder"
    assert set(read_dataset(tmp_path, reader="bccd")["dataset"]) == {"bccd"}  # still readable as BCCD when asked
