"""The table-lookup normalisation gives the float pipeline's values exactly (it is only faster)."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope.models.preprocess import Preprocess, colour_percentiles, uint8_colour_percentiles
from hematoscope.samples import sample_paths

REF = (0.27451, 0.10588, 0.50176, 1.0, 0.90588, 0.80392)


def _batches():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (5, 40, 36, 3), dtype=np.uint8)
    dark = rng.integers(0, 21, (3, 32, 32, 3), dtype=np.uint8)  # almost no pixel counts as stain ...
    dark[0, :2, :2] = 230  # ... too few to use: all pixels count
    dark[1, :12, :12] = 230  # enough to use: only these count
    flat = np.full((2, 16, 16, 3), 77, np.uint8)  # hi == lo
    from hematoscope.data.images import load_model_image

    pre = Preprocess(size=64, resize="shorter_crop", crop_pct=0.8)
    cells = np.stack([pre.resize_image(load_model_image(p, pre)) for p in sample_paths()[:8]])
    return {"noise": noise, "dark": dark, "flat": flat, "cells": cells}


@pytest.mark.parametrize("name", ["noise", "dark", "flat", "cells"])
def test_byte_histogram_percentiles_equal_numpys(name):
    batch = _batches()[name]
    lo, hi = colour_percentiles(batch.astype(np.float32) * (1.0 / 255.0))
    lo8, hi8 = uint8_colour_percentiles(batch)
    np.testing.assert_array_equal(lo8, lo)
    np.testing.assert_array_equal(hi8, hi)


@pytest.mark.parametrize("colour", ["none", "percentile"])
@pytest.mark.parametrize("name", ["noise", "dark", "flat", "cells"])
def test_lookup_normalisation_equals_the_float_pipeline(name, colour):
    batch = _batches()[name]
    pre = Preprocess(size=batch.shape[1], colour=colour, colour_ref=REF if colour != "none" else None)
    fast, reference = pre.normalize(batch), pre.normalize_reference(batch)
    assert fast.dtype == np.float32 and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, reference)
    # float input (e.g. augmented batches) takes the float pipeline
    np.testing.assert_array_equal(pre.normalize(batch.astype(np.float32)), reference)


def test_crop_of_an_already_resized_image_equals_resizing_the_original():
    rng = np.random.default_rng(1)
    pre = Preprocess(size=32, resize="shorter_crop", crop_pct=32 / 40)
    image = rng.integers(0, 256, (90, 77, 3), dtype=np.uint8)
    early = pre.early_resizer()(image)
    assert early.shape == (40, 40, 3)
    np.testing.assert_array_equal(pre.resize_image(early), pre.resize_image(image))
