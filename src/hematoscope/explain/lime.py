"""Model-agnostic image explanations with LIME (superpixels), for any bundle kind.

LIME [0] hides random sets of superpixels (SLIC), asks the model again, and fits a local linear
model of the class probability on which superpixels were visible. Superpixels are hidden by
painting them with the crop's border colour (the slide background), so "hidden" looks like
"no cell here" rather than a black hole.

[0] Ribeiro, Singh & Guestrin, "Why Should I Trust You?", KDD 2016 (the ``lime`` package).
"""
from __future__ import annotations

import contextlib
import io
from typing import Callable, Sequence

import numpy as np

from hematoscope._extras import require

PredictFn = Callable[[Sequence[np.ndarray]], np.ndarray]


def bundle_predict_fn(bundle) -> PredictFn:
    """``images -> calibrated probabilities (N, C)`` of any bundle, for :func:`explain_image`."""

    def predict(images: Sequence[np.ndarray]) -> np.ndarray:
        return bundle.calibrated_probs(bundle.forward(list(images)).logits)

    return predict


def explain_image(predict_fn: PredictFn, image: np.ndarray, label: int | None = None, *, num_samples: int = 300,
                  n_segments: int = 40, seed: int = 0, batch_size: int = 64) -> tuple[np.ndarray, bytes]:
    """LIME explanation of one image.

    Args:
        predict_fn: images (list of RGB uint8 arrays) → class probabilities (N, C); e.g.
            :func:`bundle_predict_fn`.
        image: RGB uint8 image (H, W, 3).
        label: class index to explain; default the predicted class.
        num_samples: perturbed images LIME evaluates (the cost is ``num_samples`` predictions).
        n_segments: approximate number of SLIC superpixels.
        seed: random seed of the perturbations.
        batch_size: images per ``predict_fn`` call.

    Returns:
        ``(heatmap, png)``: heatmap (H, W) float32, each pixel the LIME weight of its superpixel
        for ``label`` (positive = supports the class); png: the image with supporting superpixels
        tinted green, opposing ones red, superpixel borders drawn.

    Raises:
        ValueError: ``image`` is not RGB uint8, or ``label`` is out of range.
    """
    require("lime", "skimage", extra="explain", purpose="LIME")
    from lime import lime_image
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3); got {image.dtype} {image.shape}")

    def classifier(batch: np.ndarray) -> np.ndarray:
        return np.asarray(predict_fn([np.ascontiguousarray(b, dtype=np.uint8) for b in batch]), dtype=np.float64)

    probs = classifier(image[None])[0]
    if label is None:
        label = int(np.argmax(probs))
    elif not 0 <= label < len(probs):
        raise ValueError(f"label index {label} is out of range for {len(probs)} classes")
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = tuple(int(v) for v in np.median(border, axis=0))
    segmenter = SegmentationAlgorithm("slic", n_segments=n_segments, compactness=10, start_label=0)
    explainer = lime_image.LimeImageExplainer(random_state=seed)
    with contextlib.redirect_stderr(io.StringIO()):  # lime draws a tqdm bar we do not want
        explanation = explainer.explain_instance(image, classifier, labels=(label,), top_labels=None,
                                                 hide_color=background, num_samples=num_samples,
                                                 batch_size=batch_size, segmentation_fn=segmenter, random_seed=seed)
    segments = explanation.segments
    weights = np.zeros(segments.max() + 1, np.float32)
    for seg_id, w in explanation.local_exp[label]:
        weights[seg_id] = w
    heatmap = weights[segments]
    return heatmap, _overlay_png(image, segments, heatmap)


def _overlay_png(image: np.ndarray, segments: np.ndarray, heatmap: np.ndarray) -> bytes:
    from PIL import Image
    from skimage.segmentation import find_boundaries

    scale = float(np.abs(heatmap).max()) or 1.0
    strength = (np.abs(heatmap) / scale)[..., None] * 0.6
    tint = np.where((heatmap > 0)[..., None], np.array([0, 200, 0], np.float32), np.array([220, 0, 0], np.float32))
    out = image.astype(np.float32) * (1 - strength) + tint * strength
    out[find_boundaries(segments, mode="inner")] = (255, 255, 0)
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if min(im.size) < 256:
        factor = -(-256 // min(im.size))
        im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
