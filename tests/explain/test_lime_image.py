"""LIME superpixel explanations, for any predict function and for a real bundle."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hematoscope.explain.lime import bundle_predict_fn, explain_image


def _blue_left_image(size=48):
    rng = np.random.default_rng(0)
    im = np.full((size, size, 3), (235, 220, 200), np.uint8)
    im[:, : size // 2] = (60, 60, 200)
    return np.clip(im.astype(int) + rng.integers(-8, 8, im.shape), 0, 255).astype(np.uint8)


def _blueness_model(images):
    """P(class 1) grows with the blue pixels on the left half; class 0 is the rest."""
    p = np.array([(im[:, : im.shape[1] // 2, 2].astype(float) - im[:, : im.shape[1] // 2, 0]).clip(0).mean() / 140
                  for im in images]).clip(0, 1)
    return np.stack([1 - p, p], 1)


def test_lime_finds_the_region_the_model_uses():
    img = _blue_left_image()
    heat, png = explain_image(_blueness_model, img, label=1, num_samples=120, n_segments=16)
    assert heat.shape == img.shape[:2] and heat.dtype == np.float32
    left, right = heat[:, :20].mean(), heat[:, 28:].mean()
    assert left > 0 and left > right + abs(right)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and min(im.size) >= 256


def test_lime_default_label_and_errors():
    img = _blue_left_image()
    heat, _ = explain_image(_blueness_model, img, num_samples=30, n_segments=8)
    assert heat.shape == (48, 48)
    with pytest.raises(ValueError, match="out of range"):
        explain_image(_blueness_model, img, label=5, num_samples=10)
    with pytest.raises(ValueError, match="RGB uint8"):
        explain_image(_blueness_model, img.astype(np.float32), num_samples=10)


def test_lime_with_a_classical_bundle(tiny_classical_bundle, pbc_subset):
    from hematoscope.bundle import load_bundle
    from hematoscope.data.images import load_image

    bundle = load_bundle(tiny_classical_bundle)
    img = load_image(sorted((pbc_subset / "lymphocyte").glob("*.jpg"))[0])
    heat, png = explain_image(bundle_predict_fn(bundle), img, num_samples=16, n_segments=12)
    assert heat.shape == img.shape[:2] and np.isfinite(heat).all()
