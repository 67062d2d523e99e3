"""Segment the centre cell of a stained smear crop into nucleus and whole-cell masks.

Pipeline (scikit-image), at a fixed working scale so that every input size behaves alike:

1. Resize the crop so its shorter side is :data:`WORK_SIZE` pixels (PBC crops are ~square).
2. Nucleus stain score ``(B - G) / (B + G)``: Romanowsky-stained nuclei (and basophil granules,
   platelets) are purple-blue with little green, while red cells, eosinophil granules and the
   background are pink/beige (score <= 0). Otsu's threshold on the score, after a light Gaussian
   blur, gives candidate nuclear material; morphology removes specks and fills holes.
3. The nucleus is the stained component nearest the image centre together with the stained
   components close to it (the lobes of a segmented neutrophil are separate blobs).
4. Foreground = everything darker or more saturated than the slide background (Otsu on a
   lightness+saturation score). Touching cells are split by a marker watershed on the distance
   transform: one marker for the centre cell (its nucleus), one per distance peak elsewhere
   (red cells, other leukocytes). The centre cell is the basin of the nucleus marker.

Results are returned as :class:`Segmentation` at the working scale. ``ok`` is False with a short
``reason`` when the crop holds no stained object near its centre, when the masks are degenerate
(tiny, or the "cell" fills the frame): callers then emit missing features, not garbage ones.
Platelets are small stained objects without a surrounding cytoplasm: they segment as a nucleus
whose cell mask barely exceeds it, which is what they look like.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Shorter side, in pixels, of the image every segmentation and feature is computed on.
WORK_SIZE = 128
#: Stained objects smaller than this fraction of the working image are specks, not cells.
MIN_NUCLEUS_FRACTION = 0.0015
#: A "cell" covering more than this fraction of the working image means segmentation failed.
MAX_CELL_FRACTION = 0.6
#: The nucleus must lie within this fraction of the image side from the centre.
MAX_CENTRE_OFFSET = 0.3
#: Minimum spread (p99 - p1) of the stain score for an image to hold any stained object.
MIN_STAIN_CONTRAST = 0.12


@dataclass
class Segmentation:
    """Masks of the centre cell at the working scale.

    Attributes:
        image: the RGB uint8 working image the masks refer to (shorter side ``WORK_SIZE``).
        nucleus: boolean mask of nuclear material (for platelets: the stained granulomere).
        cell: boolean mask of the whole cell (nucleus + cytoplasm); a superset of ``nucleus``.
        ok: False when the crop could not be segmented sensibly; masks are then empty.
        reason: why ``ok`` is False (None when ok).
        scale: working-image pixels per input-image pixel (multiply input lengths by it).
        stain: the nucleus stain score image (float32), reused by the feature extractor.
    """

    image: np.ndarray
    nucleus: np.ndarray
    cell: np.ndarray
    ok: bool
    reason: str | None
    scale: float
    stain: np.ndarray

    @property
    def cytoplasm(self) -> np.ndarray:
        return self.cell & ~self.nucleus


def to_work_scale(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Resize an RGB uint8 image so its shorter side is ``WORK_SIZE``; returns (image, scale)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3); got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    scale = WORK_SIZE / min(h, w)
    size = (max(WORK_SIZE, round(w * scale)), max(WORK_SIZE, round(h * scale)))
    if size == (w, h):
        return image, 1.0
    resized = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized), scale


def stain_score(image: np.ndarray) -> np.ndarray:
    """Nucleus stain score in [-1, 1]: ``(B - G) / (B + G)`` (purple-blue nuclei are high)."""
    rgb = image.astype(np.float32)
    g, b = rgb[..., 1], rgb[..., 2]
    return (b - g) / (b + g + 1.0)


def segment_cell(image: np.ndarray) -> Segmentation:
    """Segment the cell nearest the centre of an RGB uint8 crop of any size.

    Args:
        image: (H, W, 3) uint8 RGB single-cell crop.

    Returns:
        A :class:`Segmentation` at the working scale; check ``ok`` before using the masks.

    Raises:
        ValueError: ``image`` is not an RGB uint8 array.
        MissingExtraError: scikit-image is not installed.
    """
    from scipy import ndimage as ndi

    from hematoscope._extras import require

    require("skimage", extra="classical", purpose="cell segmentation")
    from skimage import filters, measure, morphology, segmentation

    work, scale = to_work_scale(image)
    h, w = work.shape[:2]
    n_px = h * w
    stain = stain_score(work)
    empty = np.zeros((h, w), bool)

    def failed(reason: str) -> Segmentation:
        return Segmentation(work, empty, empty.copy(), False, reason, scale, stain)

    lo, hi = np.percentile(stain, [1, 99])
    if hi - lo < MIN_STAIN_CONTRAST:
        return failed("no stained object (flat colour)")
    # The threshold comes from the blurred score (robust to JPEG noise) but is applied to the raw
    # score, so that the blur does not move the nucleus border outwards. Otsu on a flat-ish
    # histogram can fall inside the background: never call pink/beige (score <= 0.05) nuclear.
    thr = max(filters.threshold_otsu(filters.gaussian(stain, sigma=1.0)), 0.05)
    stained = stain > thr
    min_obj = max(4, int(MIN_NUCLEUS_FRACTION * n_px))
    stained = morphology.remove_small_objects(stained, max_size=min_obj - 1)
    stained = ndi.binary_fill_holes(ndi.binary_closing(stained, morphology.disk(1)))
    if not stained.any():
        return failed("no stained object large enough to be a nucleus")

    labels = measure.label(stained)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.indices((h, w))
    centre_dist = np.hypot(yy - cy, xx - cx)
    # The component that reaches closest to the centre seeds the nucleus.
    dist_per_label = ndi.minimum(centre_dist, labels, index=np.arange(1, labels.max() + 1))
    seed = int(np.argmin(dist_per_label)) + 1
    if dist_per_label[seed - 1] > MAX_CENTRE_OFFSET * min(h, w):
        return failed("no stained object near the centre")
    # Lobes of one nucleus lie within a few pixels of each other: group them with the seed.
    seed_mask = labels == seed
    near = ndi.binary_dilation(seed_mask, morphology.disk(max(2, round(0.05 * WORK_SIZE))))
    group = np.unique(labels[near & stained])
    nucleus = np.isin(labels, group[group > 0])

    # Foreground (cells) vs slide background: darker or more saturated than the background.
    rgb = work.astype(np.float32) / 255.0
    sat = rgb.max(2) - rgb.min(2)
    dark = 1.0 - rgb.mean(2)
    fg_score = filters.gaussian(sat + dark, sigma=1.0)
    # Otsu without the nuclear pixels, else it splits nucleus vs rest instead of cells vs slide.
    fg = fg_score > filters.threshold_otsu(fg_score[~stained])
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg | nucleus, morphology.disk(1)))

    # Marker watershed on the distance transform splits the centre cell from touching cells.
    dist = ndi.distance_transform_edt(fg)
    centre_marker = ndi.binary_dilation(nucleus, morphology.disk(2))
    peaks = _distance_peaks(dist, exclude=ndi.binary_dilation(nucleus, morphology.disk(6)))
    markers = np.zeros((h, w), np.int32)
    markers[peaks] = np.arange(2, peaks.sum() + 2)
    markers[centre_marker & fg] = 1
    basins = segmentation.watershed(-dist, markers, mask=fg)
    cell = ndi.binary_fill_holes(basins == 1) | nucleus
    cell = ndi.binary_opening(cell, morphology.disk(1)) | nucleus
    cell = _largest_component_with(cell, nucleus)
    nucleus &= cell

    nuc_area, cell_area = int(nucleus.sum()), int(cell.sum())
    if nuc_area < min_obj:
        return failed("nucleus too small")
    if cell_area > MAX_CELL_FRACTION * n_px:
        return failed("cell mask fills the image")
    return Segmentation(work, nucleus, cell, True, None, scale, stain)


def _distance_peaks(dist: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Boolean mask of distance-transform maxima (one per roundish object) outside ``exclude``."""
    from skimage.feature import peak_local_max

    min_distance = max(3, round(0.05 * WORK_SIZE))
    coords = peak_local_max(dist, min_distance=min_distance, threshold_abs=2.0, exclude_border=False)
    out = np.zeros(dist.shape, bool)
    if len(coords):
        out[coords[:, 0], coords[:, 1]] = True
    return out & ~exclude


def _largest_component_with(mask: np.ndarray, core: np.ndarray) -> np.ndarray:
    """The connected component(s) of ``mask`` that overlap ``core``."""
    from skimage import measure

    labels = measure.label(mask)
    keep = np.unique(labels[core & mask])
    return np.isin(labels, keep[keep > 0])


def overlay(seg: Segmentation) -> np.ndarray:
    """RGB uint8 image with the cell contour (yellow) and nucleus contour (cyan) drawn on it."""
    from skimage.segmentation import find_boundaries

    out = seg.image.copy()
    out[find_boundaries(seg.cell, mode="inner")] = (255, 220, 0)
    out[find_boundaries(seg.nucleus, mode="inner")] = (0, 230, 255)
    return out


def overlay_png(seg: Segmentation, size: int = 256) -> bytes:
    """PNG bytes of :func:`overlay`, upscaled (nearest) so the contours stay crisp."""
    import io

    from PIL import Image, ImageDraw

    im = Image.fromarray(overlay(seg))
    factor = max(1, size // min(im.size))
    im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    if not seg.ok:
        ImageDraw.Draw(im).text((4, 4), f"failed: {seg.reason}", fill=(200, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
