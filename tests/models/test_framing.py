"""Preprocess.framing: the share of each image's side the model sees (a lab's framing)."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope.models.preprocess import Preprocess, centre_crop, reframe_image


def _image(h=90, w=70, seed=0):
    rng = np.random.default_rng(seed)
    im = np.full((h, w, 3), (220, 200, 190), np.uint8)  # a cream background, a "cell" in the middle third
    top, left = h // 3, w // 3
    im[top:2 * top, left:2 * left] = rng.integers(40, 160, (top, left, 3))
    return im


def test_reframe_crops_or_pads_with_the_background_colour():
    im = _image()
    assert reframe_image(im, 1.0) is im
    np.testing.assert_array_equal(reframe_image(im, 0.5), centre_crop(im, 0.5))
    big = reframe_image(im, 2.0)
    assert big.shape == (180, 140, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(big[45:135, 35:105], im)
    assert (big[0, 0] == (220, 200, 190)).all() and (big[-1, -1] == (220, 200, 190)).all()


def test_preprocess_applies_the_framing_before_resizing():
    im = _image(120, 120)
    plain = Preprocess(size=32, resize="squash")
    framed = Preprocess(size=32, resize="squash", framing=0.5)
    np.testing.assert_array_equal(framed([im]), plain([centre_crop(im, 0.5)]))
    assert not np.allclose(framed([im]), plain([im]))
    padded = Preprocess(size=32, resize="squash", framing=1.5)
    np.testing.assert_array_equal(padded([im]), plain([reframe_image(im, 1.5)]))


def test_framing_round_trips_and_changes_what_is_decoded():
    p = Preprocess(size=128, resize="shorter_crop", crop_pct=128 / 144, framing=0.75)
    assert Preprocess.from_dict(p.to_dict()) == p
    assert "framing" not in Preprocess(size=128).to_dict()  # bundles without it keep their bytes
    assert p.decode_size == 192 and p.early_resizer() is None  # the centre must keep its detail
    assert Preprocess(size=128, framing=2.0).decode_size == 128
    for bad in (0.1, 5.0):
        with pytest.raises(ValueError, match="framing"):
            Preprocess(framing=bad)


def test_stained_share_grows_with_the_square_of_the_zoom_on_real_cells(pbc_subset):
    """The framing search's size gauge: the share of stained-nucleus pixels in the model input."""
    from hematoscope import load_bundle
    from hematoscope.data.images import load_model_image

    spec = load_bundle("default").preprocess
    cells = [load_model_image(p, spec) for p in sorted(pbc_subset.rglob("*.jpg"))[:24]]
    whole = spec.stained_share(cells)
    half = spec.stained_share([centre_crop(c, 0.5) for c in cells])
    assert whole.shape == (24,) and ((whole >= 0) & (whole <= 1)).all()
    assert 0.02 < np.median(whole) < 0.15  # PBC: the cell in the middle third of its crop
    ratio = np.median(half) / np.median(whole)
    assert 2.5 < ratio < 5, ratio  # 4 for a cell whose nucleus stays inside the centre half
    assert spec.stained_share([np.full((60, 60, 3), 235, np.uint8)]).tolist() == [0.0]
    assert spec.stained_share([]).shape == (0,)


def test_a_crop_cut_through_the_cell_is_padded_with_the_background_not_the_cell():
    im = _image(90, 90)
    tight = centre_crop(im, 0.45)  # the "cell" reaches every edge but background remains in the corners
    tight[:4], tight[-4:] = (90, 60, 140), (90, 60, 140)  # purple along the top and bottom edges
    tight[:, :2] = (220, 200, 190)
    big = reframe_image(tight, 2.0)
    assert (big[0, 0] == (220, 200, 190)).all(), big[0, 0]


def test_recolour_changes_what_the_colour_canonicalisation_keeps():
    from hematoscope.models.preprocess import recolour_image

    im = _image()
    grey = np.repeat(im.mean(axis=2, keepdims=True).round().astype(np.uint8), 3, axis=2)
    for kind, factor in (("saturation", 1.5), ("saturation", 0.5), ("gamma", 1.4), ("gamma", 0.7)):
        out = recolour_image(im, kind, factor)
        assert out.shape == im.shape and out.dtype == np.uint8 and not np.array_equal(out, im)
        np.testing.assert_array_equal(recolour_image(grey, "saturation", factor), grey)  # no colour to scale
    spread = lambda x: np.ptp(x.astype(int), axis=2).mean()  # noqa: E731
    assert spread(recolour_image(im, "saturation", 2.0)) > 1.5 * spread(im)
    assert recolour_image(im, "gamma", 1.4).astype(int).sum() < im.astype(int).sum()  # darker mid-tones
    np.testing.assert_array_equal(recolour_image(im, "gamma", 1.0), im)
    with pytest.raises(ValueError, match="unknown colour change"):
        recolour_image(im, "hue", 1.2)
