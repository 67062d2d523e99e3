"""The named feature vector: stable names/order, finite values, failures as NaN, disk cache."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hematoscope.classical.features import (FEATURE_NAMES, FEATURES, ClassicalFeatures, cell_features,
                                            feature_spec)

SEGMENTATION_FREE = [n for n in FEATURE_NAMES if n.split("_")[0] in ("seg", "img", "centre")]


def test_table_is_documented_and_unique():
    assert 50 <= len(FEATURES) <= 300
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    for f in FEATURES:
        assert f.name.replace("_", "").isalnum() and f.unit and len(f.description) > 5
    assert feature_spec("nc_ratio").unit == "ratio"


def test_names_shape_and_order_are_stable(draw_cell):
    a, b = ClassicalFeatures(n_jobs=1, cache=False), ClassicalFeatures(n_jobs=1, cache=False)
    assert list(a.get_feature_names_out()) == list(b.get_feature_names_out()) == FEATURE_NAMES
    images = [draw_cell(64), draw_cell(128)]
    x1 = a.fit_transform(images)
    x2 = b.transform(images[::-1])[::-1]
    assert x1.shape == (2, len(FEATURES)) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)


def test_segmented_cell_has_finite_features(draw_cell):
    x = cell_features(draw_cell())
    bad = [n for n, v in zip(FEATURE_NAMES, x) if not np.isfinite(v)]
    assert not bad


def test_failed_segmentation_gives_nan_and_flag():
    flat = np.full((48, 48, 3), 200, np.uint8)
    f = dict(zip(FEATURE_NAMES, cell_features(flat)))
    assert f["seg_ok"] == 0
    assert np.isnan(f["nuc_area"]) and np.isnan(f["cyto_glcm_contrast_d1"])
    assert all(np.isfinite(f[n]) for n in SEGMENTATION_FREE)


def test_real_images_finite_where_segmented(pbc_subset):
    files = sorted(pbc_subset.rglob("*.jpg"))[::4]
    x = ClassicalFeatures(n_jobs=1, cache=False).transform(files)
    ok = x[:, FEATURE_NAMES.index("seg_ok")] == 1
    assert ok.mean() >= 0.9
    nuc_cols = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("nuc_")]
    assert np.isfinite(x[np.ix_(ok, nuc_cols)]).all()


def test_cache_hit_and_unreadable_files(tmp_path, draw_cell):
    good = tmp_path / "cell.png"
    Image.fromarray(draw_cell()).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    fx = ClassicalFeatures(n_jobs=1, cache=True)
    first = fx.transform([good])
    from hematoscope.paths import cache_dir

    cached = list(cache_dir("classical").rglob("*.npy"))
    assert cached
    second = fx.transform([good, good.read_bytes()])
    np.testing.assert_array_equal(second, np.vstack([first, first]))
    from hematoscope.data.images import ImageError

    with pytest.raises(ImageError, match="broken.jpg"):
        fx.transform([bad])
    rows = ClassicalFeatures(n_jobs=1, on_error="nan").transform([good, bad])
    assert np.isfinite(rows[0, 0]) and np.isnan(rows[1]).all()


@pytest.mark.slow  # worker processes start in ~10 s on a loaded 2-core machine
def test_parallel_matches_serial(draw_cell):
    images = [draw_cell(64), draw_cell(96), np.full((40, 40, 3), 10, np.uint8)]
    serial = ClassicalFeatures(n_jobs=1, cache=False).transform(images)
    parallel = ClassicalFeatures(n_jobs=2, cache=False, chunk_size=1).transform(images)
    np.testing.assert_array_equal(serial, parallel)


def test_sklearn_contract(draw_cell):
    from sklearn.base import clone

    fx = ClassicalFeatures(n_jobs=1, on_error="nan")
    assert clone(fx).get_params() == fx.get_params()
    with pytest.raises(ValueError, match="on_error"):
        ClassicalFeatures(on_error="ignore").transform([draw_cell()])


def test_docs_table_is_generated_from_features():
    from pathlib import Path

    from hematoscope.classical.features import features_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "classical.md"
    assert features_markdown() in doc.read_text(encoding="utf-8"), \
        "docs/classical.md is stale: paste hematoscope.classical.features.features_markdown() into it"
