"""An explanation's map drawn over its image: one look for every picture of it (Grad-CAM's or the
segmentation's PNG, the web app's card and its full-size view), whatever the image's resolution.

The colour map and blend are pytorch-grad-cam's (``show_cam_on_image``) and the outlines
scikit-image's (``mark_boundaries``), each imported when such a map is drawn: only installs that
made one (the ``explain`` or ``classical`` extra) draw it."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hematoscope.bundle.prediction import Explanation


def resize_map(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float map resized (bilinear) to ``shape`` (H, W)."""
    from PIL import Image

    if a.shape == tuple(shape):
        return a
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray, *, image_weight: float = 0.55,
                    max_side: int | None = None) -> np.ndarray:
    """The heatmap drawn over the image as a colour map (RGB uint8).

    Args:
        image: RGB uint8 (H, W, 3).
        heatmap: (h, w) in [0, 1] over the same field of view: resized to the image, so a map
            computed on a small decode of an upload can be drawn over a larger one.
        image_weight: how much of the image shows through (0..1).
        max_side: shrink the result so its longer side is at most this (None = full size).
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = _fit(image, max_side)
    heatmap = resize_map(np.clip(heatmap, 0, 1).astype(np.float32), image.shape[:2])
    return show_cam_on_image(image.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=image_weight)


#: Colour of segmentation outlines (RGB in 0..1): yellow reads on both stained cells and background.
OUTLINE_COLOUR = (1.0, 0.85, 0.0)


def outline_overlay(image: np.ndarray, regions: np.ndarray, *, max_side: int | None = None) -> np.ndarray:
    """The borders between labelled regions (e.g. background 0, cytoplasm 1, nucleus 2) drawn
    on the image (RGB uint8), with scikit-image's ``mark_boundaries``.

    Args:
        image: RGB uint8 (H, W, 3).
        regions: integer (h, w) labels over the same field of view: resized (nearest) to the
            image, so outlines found on a small working copy are drawn sharp on a larger one.
        max_side: shrink the result so its longer side is at most this (None = full size).
    """
    from PIL import Image
    from skimage.segmentation import mark_boundaries

    image = _fit(image, max_side)
    labels = np.asarray(Image.fromarray(np.asarray(regions, dtype=np.uint8)).resize(
        (image.shape[1], image.shape[0]), Image.Resampling.NEAREST))
    drawn = mark_boundaries(image, labels, color=OUTLINE_COLOUR, mode="thick")
    return (drawn * 255).round().astype(np.uint8)


def draw_explanation(explanation: "Explanation", image: np.ndarray, *, max_side: int | None = None
                     ) -> np.ndarray | None:
    """The map an explanation's ``png`` shows (its ``heatmap`` as a colour map, or the borders of
    its ``regions``) drawn again over ``image``, any copy of the explained image (e.g. the
    full-size upload); RGB uint8, or None when the explanation has no map."""
    if explanation.heatmap is not None:
        return heatmap_overlay(image, explanation.heatmap, max_side=max_side)
    if explanation.regions is not None:
        return outline_overlay(image, explanation.regions, max_side=max_side)
    return None


def _fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    from PIL import Image

    if not max_side or max(image.shape[:2]) <= max_side:
        return image
    scale = max_side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def overlay_png(image: np.ndarray, heatmap: np.ndarray, *, image_weight: float = 0.55,
                max_side: int | None = None) -> bytes:
    """:func:`heatmap_overlay`, encoded as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(heatmap_overlay(image, heatmap, image_weight=image_weight, max_side=max_side)).save(
        buf, format="PNG", optimize=True)
    return buf.getvalue()
