import numpy as np
import pytest

from hematoscope.data.images import load_image
from hematoscope.data.readers import read_dataset
from hematoscope.data.synthetic import PBC_CLASSES, make_synthetic_dataset, synthetic_cell


def test_synthetic_cell_shape_and_dtype():
    img = synthetic_cell("neutrophil", np.random.default_rng(0), 48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert img.std() > 10  # not a flat image


def test_dataset_is_deterministic_and_seed_dependent(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", classes=["lymphocyte", "platelet"], n_per_class=3, size=32, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", classes=["lymphocyte", "platelet"], n_per_class=3, size=32, seed=5)
    c = make_synthetic_dataset(tmp_path / "c", classes=["lymphocyte", "platelet"], n_per_class=3, size=32, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_adding_a_class_keeps_other_classes_unchanged(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", classes=["monocyte"], n_per_class=2, size=32)
    b = make_synthetic_dataset(tmp_path / "b", classes=["basophil", "monocyte"], n_per_class=2, size=32)
    assert (a / "monocyte/monocyte_0001.png").read_bytes() == (b / "monocyte/monocyte_0001.png").read_bytes()


def test_synthetic_root_fixture_reads_as_pbc_classes(synthetic_root):
    table = read_dataset(synthetic_root, reader="folder")
    assert sorted(table["label"].unique()) == sorted(PBC_CLASSES)
    assert table.groupby("label").size().eq(12).all()
    assert load_image(table["path"][0]).shape == (64, 64, 3)


def test_jpeg_format_and_unknown_class(tmp_path):
    root = make_synthetic_dataset(tmp_path, classes=["smudge_cell"], n_per_class=2, size=40, fmt="jpg")
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 2 and load_image(files[0]).shape == (40, 40, 3)


@pytest.mark.parametrize("kwargs", [{"classes": []}, {"classes": ["a", "a"]}, {"n_per_class": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, **kwargs)


def test_classes_are_separable_by_colour_histograms(synthetic_root):
    """A linear model on colour histograms beats chance (1/8) by far on held-out images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    table = read_dataset(synthetic_root, reader="folder")
    feats = []
    for p in table["path"]:
        img = load_image(p).reshape(-1, 3)
        hist = [np.histogram(img[:, c], bins=16, range=(0, 256))[0] for c in range(3)]
        feats.append(np.concatenate(hist) / img.shape[0])
    scores = cross_val_score(LogisticRegression(C=10.0, max_iter=2000), np.array(feats), table["label"], cv=3)
    assert scores.mean() > 0.8
