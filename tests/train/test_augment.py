"""Domain randomisation (training only) and colour canonicalisation (in every bundle's Preprocess)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hematoscope.data.images import load_image
from hematoscope.models.preprocess import Preprocess, colour_percentiles, colour_reference
from hematoscope.train import TrainConfig
from hematoscope.train.data import batch_color_jitter, batch_random_conv, batch_stain_jitter, degrade

ALL_ON = dict(blur_prob=1.0, resample_prob=1.0, jpeg_prob=1.0, bars_prob=1.0)


@pytest.fixture(scope="module")
def cells(pbc_subset):
    paths = sorted(pbc_subset.rglob("*.jpg"))[:8]
    pre = Preprocess(size=64, resize="shorter_crop", crop_pct=0.9)
    return np.stack([pre.resize_image(load_image(p)) for p in paths])


#: Domain randomisation off (the defaults turn it all on): each test turns on what it measures.
PLAIN = dict(color_jitter=0.1, stain_jitter=0.03, hue_jitter=0.0, gamma_jitter=0.0, hed_jitter=0.0, noise=0.0,
             grey_prob=0.0, blur_prob=0.0, resample_prob=0.0, jpeg_prob=0.0, bars_prob=0.0, scale_jitter=0.0)


def config(**kw) -> TrainConfig:
    return TrainConfig(data="d", out="o", **{**PLAIN, **kw})


@pytest.mark.parametrize("option", ["blur_prob", "resample_prob", "jpeg_prob", "bars_prob"])
def test_each_degradation_keeps_shape_dtype_and_changes_pixels_reproducibly(cells, option):
    cfg = config(**{option: 1.0})
    torch.manual_seed(3)
    a = degrade(cells[0], cfg)
    torch.manual_seed(3)
    b = degrade(cells[0], cfg)
    assert a.shape == cells[0].shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # seeded
    assert np.abs(a.astype(int) - cells[0]).mean() > 0.1  # it did something
    np.testing.assert_array_equal(degrade(cells[0], config()), cells[0])  # off by default → identity


def test_black_bar_is_black_and_on_one_edge(cells):
    torch.manual_seed(0)
    out = degrade(cells[1], config(bars_prob=1.0))
    edges = [out[0], out[-1], out[:, 0], out[:, -1]]
    assert sum(int((e == 0).all()) for e in edges) >= 1


@pytest.mark.parametrize("kw", [dict(hue=0.1), dict(gamma=0.3), dict(hed=0.1), dict(noise=0.05), dict(grey=0.5),
                                dict(hue=0.1, gamma=0.3, hed=0.1, noise=0.05)])
def test_batch_stain_jitter_keeps_range_and_is_seeded(cells, kw):
    x = torch.from_numpy(cells).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(1)
    a = batch_stain_jitter(x.clone(), **kw)
    torch.manual_seed(1)
    b = batch_stain_jitter(x.clone(), **kw)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b)
    assert float((a - x).abs().mean()) > 1e-3
    # one draw per image: the images do not all move the same way
    shift = (a - x).mean((2, 3))
    assert float(shift.std(0).max()) > 1e-4


def test_saturation_jitter_scales_colourfulness_both_ways_and_is_seeded(cells):
    x = torch.from_numpy(cells).permute(0, 3, 1, 2).float() / 255
    chroma = lambda t: (t.amax(1) - t.amin(1)).mean((1, 2))  # noqa: E731
    ratios = []
    for seed in range(6):
        torch.manual_seed(seed)
        a = batch_color_jitter(x.clone(), 0.0, 0.0, saturation=1.0)
        torch.manual_seed(seed)
        torch.testing.assert_close(a, batch_color_jitter(x.clone(), 0.0, 0.0, saturation=1.0))
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        ratios.append(chroma(a) / chroma(x))
    ratios = torch.cat(ratios)
    assert float(ratios.max()) > 1.3 and float(ratios.min()) < 0.75  # up to 2x more and 2x less saturated
    assert config(saturation_jitter=1.0).saturation_jitter == 1.0 and config().saturation_jitter is None
    with pytest.raises(ValueError):
        config(saturation_jitter=-0.5)


def test_random_conv_keeps_shape_and_range_is_seeded_and_off_by_default(cells):
    x = torch.from_numpy(cells).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(2)
    a = batch_random_conv(x, 1.0)
    torch.manual_seed(2)
    b = batch_random_conv(x, 1.0)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b)
    assert bool(((a - x).abs().mean((1, 2, 3)) > 1e-3).all())  # every image filtered at prob 1
    torch.testing.assert_close(batch_random_conv(x, 0.0), x)
    torch.manual_seed(2)
    half = batch_random_conv(x, 0.5)
    changed = (half - x).abs().mean((1, 2, 3)) > 1e-6
    assert 0 < int(changed.sum()) < len(x)  # a share, not all or nothing
    torch.testing.assert_close(half[~changed], x[~changed])


def test_stain_jitter_with_zero_strength_is_identity(cells):
    x = torch.from_numpy(cells).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(batch_stain_jitter(x.clone()), x)


def test_hue_rotation_keeps_brightness(cells):
    x = torch.from_numpy(cells).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    y = batch_stain_jitter(x.clone(), hue=0.02)  # small: little clipping
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert float(((y - x) * luma).sum(1).abs().mean()) < 0.01


def test_canonicalisation_maps_percentiles_onto_the_reference(cells):
    ref = colour_reference(cells)
    pre = Preprocess(size=64, colour="percentile", colour_ref=ref)
    # the same cells under another lab's white balance, contrast and a black bar
    shifted = np.clip(cells.astype(np.float32) * [0.8, 0.9, 1.1] + [30, 10, 0], 0, 255).astype(np.uint8)
    shifted[:, :10] = 0
    out = pre.canonicalise(shifted.astype(np.float32) / 255)
    lo, hi = colour_percentiles(out)
    np.testing.assert_allclose(np.median(lo, 0), ref[:3], atol=0.03)
    np.testing.assert_allclose(np.median(hi, 0), ref[3:], atol=0.03)
    plain = pre.canonicalise(cells.astype(np.float32) / 255)
    assert np.abs(out[:, 10:] - plain[:, 10:]).mean() < 0.05  # the shift is mostly undone
    assert np.abs(shifted[:, 10:] / 255 - cells[:, 10:] / 255).mean() > 0.05


def test_colour_settings_round_trip_and_are_validated():
    pre = Preprocess(size=64, colour="percentile", colour_ref=[0.2, 0.1, 0.4, 0.95, 0.9, 0.8])
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert "colour" not in Preprocess(size=64).to_dict()  # old bundles' preprocess dicts unchanged
    with pytest.raises(ValueError, match="colour_ref"):
        Preprocess(colour="percentile")
    with pytest.raises(ValueError, match="colour_ref"):
        Preprocess(colour="percentile", colour_ref=[0.9, 0.1, 0.4, 0.5, 0.9, 0.8])  # hi below lo
    with pytest.raises(ValueError, match="colour must be"):
        Preprocess(colour="macenko")


def test_zoom_out_crops_are_padded_to_the_model_size(cells):
    from hematoscope.train.data import TrainImages

    cfg = config(size=32, crop_pct=32 / 36, scale_jitter=0.9, **ALL_ON)
    pre = Preprocess(size=36, resize="shorter_crop")
    images = np.stack([pre.resize_image(c) for c in cells])
    ds = TrainImages(images, [""] * len(images), np.zeros(len(images), int), cfg)
    torch.manual_seed(0)
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_a_scale_range_leaning_out_shows_the_cells_smaller_and_repeats_its_draws(cells):
    """``scale_range``: crop sides log-uniform in the range; [1.5, 2.5] only zooms out, so the
    dark-stained nucleus fills less of the frame than in the plain centre crop."""
    from hematoscope.train.data import TrainImages

    pre = Preprocess(size=72, resize="shorter_crop")
    images = np.stack([pre.resize_image(c) for c in cells])

    def crops(**kw):
        ds = TrainImages(images, [""] * len(images), np.zeros(len(images), int),
                         config(size=64, crop_pct=64 / 72, **kw))
        return np.stack([ds[i][0].numpy() for i in range(len(ds))])

    def dark_share(x):
        return float((x.max(axis=1) < 140).mean())

    out = crops(scale_range=(1.5, 2.5))
    assert out.shape == (len(cells), 3, 64, 64) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, crops(scale_range=(1.5, 2.5)))  # drawn from (seed, epoch, index)
    assert dark_share(out) < 0.6 * dark_share(crops())
    with pytest.raises(ValueError, match="scale_range"):
        config(scale_range=(1.2, 0.8))


def test_input_size_is_bounded_when_the_run_is_configured():
    """An input side beyond what Preprocess accepts is refused with the run's other options, not
    after the images have been decoded (100,000 px was OOM-killed at 22 GB)."""
    with pytest.raises(ValueError, match="less than or equal to 1024"):
        config(size=4096)
    assert config(size=1024).size == 1024
