from hematoscope.data.images import load_image
from hematoscope.data.readers import read_dataset
from hematoscope.data.synthetic import PBC_CLASSES
from hematoscope.samples import sample_paths, samples_dir


def test_samples_are_real_pbc_images_three_per_class():
    paths = sample_paths()
    assert len(paths) == 24
    assert sorted({p.parent.name for p in paths}) == sorted(PBC_CLASSES)
    assert all(p.parent.parent == samples_dir() for p in paths)
    img = load_image(paths[0])
    assert img.ndim == 3 and min(img.shape[:2]) >= 200  # real 256 px crops, not thumbnails


def test_samples_carry_their_credit():
    text = (samples_dir() / "README.md").read_text()
    assert "10.1016/j.dib.2020.105474" in text and "CC BY 4.0" in text


def test_samples_read_as_a_dataset():
    table = read_dataset(samples_dir(), reader="folder")
    assert len(table) == 24 and table.groupby("label").size().eq(3).all()
