"""Preprocess.bars: black padding along a crop's edges becomes slide background before the model."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope.models.preprocess import DARK, Preprocess, fill_bars

BACKGROUND = (225, 205, 235)


def _cell(h=80, w=100):
    im = np.full((h, w, 3), BACKGROUND, np.uint8)
    im[h // 3:2 * h // 3, w // 3:2 * w // 3] = 5  # a near-black "nucleus" inside the image: never a bar
    return im


def _dark_share(im):
    return (im.max(axis=2) < round(DARK * 255)).mean()


def test_a_corner_block_of_bars_is_filled_and_the_rest_kept():
    im = _cell()
    barred = im.copy()
    barred[:12] = 0  # rows at the top, then columns at the left: an L of padding
    barred[:, :20] = 0
    barred[:12, 40:43] = (30, 25, 28)  # JPEG-ish noise: a bar need not be black throughout
    out = fill_bars(barred)
    assert out.shape == im.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[12:, 20:], barred[12:, 20:])
    np.testing.assert_array_equal(out[:12], np.broadcast_to(BACKGROUND, out[:12].shape))
    np.testing.assert_array_equal(out[:, :20], np.broadcast_to(BACKGROUND, out[:, :20].shape))
    assert _dark_share(out) == _dark_share(im)  # only the nucleus is dark
    np.testing.assert_array_equal(fill_bars(out), out)  # a second pass changes nothing


def test_images_without_bars_pass_untouched():
    im = _cell()
    assert fill_bars(im) is im
    edge_cell = im.copy()
    edge_cell[30:50, :10] = 0  # a dark object touching one edge over a quarter of it
    assert fill_bars(edge_cell) is edge_cell
    black = np.zeros((40, 40, 3), np.uint8)
    assert fill_bars(black) is black  # nothing but bars: left to the OOD flag
    grey = np.zeros((40, 40), np.uint8)
    assert fill_bars(grey) is grey


def test_preprocess_fills_bars_first_and_records_it():
    im = _cell()
    barred = im.copy()
    barred[-25:] = 0
    keep, fill = Preprocess(size=32, resize="squash"), Preprocess(size=32, resize="squash", bars="fill")
    np.testing.assert_array_equal(fill([barred]), keep([fill_bars(barred)]))
    assert not np.allclose(keep([barred]), fill([barred]))
    np.testing.assert_array_equal(fill([im]), keep([im]))
    framed = Preprocess(size=32, resize="squash", bars="fill", framing=1.5)  # padding sees the filled crop
    np.testing.assert_array_equal(framed([barred]), Preprocess(size=32, resize="squash", framing=1.5)(
        [fill_bars(barred)]))
    assert Preprocess.from_dict(fill.to_dict()) == fill
    assert "bars" not in keep.to_dict()  # bundles without it keep their bytes
    with pytest.raises(ValueError, match="bars"):
        Preprocess(bars="crop")


def test_a_lisc_crop_cut_at_the_slide_edge_is_answered_as_its_filled_copy(lisc_root):
    """The shipped model fills bars on every path: a file with bars, the array with bars and the
    filled array give one answer, through the cascade and the framing search."""
    from PIL import Image

    from hematoscope import load_bundle

    path = lisc_root / "basophil" / "lisc_bas_134.jpg"  # black along its top and left edges
    raw = np.asarray(Image.open(path).convert("RGB"))
    filled = fill_bars(raw)
    assert _dark_share(raw) > 0.3 and _dark_share(filled) < 0.01
    bundle = load_bundle("default")
    assert bundle.preprocess.bars == "fill"
    pred = bundle.predict([raw, filled, path])
    np.testing.assert_allclose(pred.probs[0], pred.probs[1], atol=1e-6)
    np.testing.assert_allclose(pred.probs[0], pred.probs[2], atol=2e-2)  # the file is draft-decoded
    assert pred.ood_score[0] == pytest.approx(pred.ood_score[1], abs=1e-6)
