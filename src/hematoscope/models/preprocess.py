"""The preprocessing spec that travels with every model: training, evaluation, predict, ONNX
and the web app all build their input from this one object, so they cannot drift apart."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence, get_args

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


#: The largest model input side accepted (cell classifiers take 128-512 px).
MAX_INPUT_SIZE = 1024


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes a model input.

    Attributes:
        size: side of the square model input, in pixels.
        resize: ``"squash"`` resizes the whole image to size x size (cell crops are near-square,
            nothing is cut); ``"shorter_crop"`` resizes the shorter side to ``size / crop_pct``
            then centre-crops.
        crop_pct: fraction kept by the centre crop for ``"shorter_crop"``.
        mean, std: per-channel normalisation in [0, 1] units.
        interpolation: resampling filter name.
        colour: per-image colour canonicalisation applied after resizing, before ``mean``/``std``:
            ``"none"``, or ``"percentile"``: each channel's 1st and 99th percentiles (over the
            pixels that are not near-black, so padding bars do not count) are mapped linearly
            onto ``colour_ref``. It removes most of a lab's stain, white balance and contrast
            differences while keeping the colour relations inside a cell.
        colour_ref: ``[lo_r, lo_g, lo_b, hi_r, hi_g, hi_b]`` in [0, 1], the reference
            percentiles (medians over the training images, see :func:`colour_reference`).
        framing: share of each image's side the model sees, before resizing: 1 = the image as
            it is, below 1 its centre (a lab that frames cells looser than training did), above 1
            the image padded with its background colour (a lab that crops tighter). Chosen per lab
            by ``hematoscope adapt`` (:func:`reframe_image`).
        bars: ``"keep"``, or ``"fill"``: near-black bars along the image's edges (the padding a
            lab adds where its crop runs past the slide image's border) are painted with the
            image's white point before anything else (:func:`fill_bars`), so the model sees
            slide background where the lab's crop had none.
        jpeg_draft: a JPEG file at least twice the decode size may be decoded at a reduced scale
            (DCT scaling, :data:`~hematoscope.data.images.DRAFT_DECODE`): 1.5-2x faster, but its
            pixels then differ from those of the same image given as an array. False decodes
            every file at full size (classical bundles, whose segmentation and texture features
            are sensitive to it).
    """

    size: int = 128
    resize: str = "squash"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    colour: str = "none"
    colour_ref: tuple[float, ...] | None = None
    framing: float = 1.0
    bars: str = "keep"
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if not 8 <= self.size <= MAX_INPUT_SIZE:  # a config's 100000 would take all the memory on its first image
            raise ValueError(f"input size must be 8 to {MAX_INPUT_SIZE} px; got {self.size}")
        if self.resize not in ("squash", "shorter_crop"):
            raise ValueError(f"resize must be 'squash' or 'shorter_crop'; got {self.resize!r}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.1, 1]; got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}; got {self.interpolation!r}")
        if not 0.3 <= self.framing <= 3.0:
            raise ValueError(f"framing must be in [0.3, 3]; got {self.framing}")
        object.__setattr__(self, "framing", float(self.framing))
        if self.bars not in BAR_MODES:
            raise ValueError(f"bars must be one of {BAR_MODES}; got {self.bars!r}")
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"colour must be one of {COLOUR_MODES}; got {self.colour!r}")
        if self.colour != "none":
            ref = self.colour_ref
            if ref is None or len(ref) != 6 or not all(0 <= float(v) <= 1 for v in ref) \
                    or any(float(ref[i + 3]) <= float(ref[i]) for i in range(3)):
                raise ValueError(f"colour {self.colour!r} needs colour_ref = [lo_r, lo_g, lo_b, hi_r, hi_g, hi_b] "
                                 f"in [0, 1] with hi > lo; got {ref!r}")
            object.__setattr__(self, "colour_ref", tuple(float(v) for v in ref))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.colour == "none":  # older readers of the format do not know these fields
            del d["colour"], d["colour_ref"]
        else:
            d["colour_ref"] = list(self.colour_ref)
        if self.framing == 1.0:
            del d["framing"]
        if self.bars == "keep":
            del d["bars"]
        if self.jpeg_draft:
            del d["jpeg_draft"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocess fields {sorted(unknown)}")
        return cls(**d)

    # --- application ----------------------------------------------------------------------
    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """Resize (and crop) an RGB uint8 image to ``size x size``; stays uint8."""
        from PIL import Image

        resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST,
            "area": Image.Resampling.BOX,
        }[self.interpolation]
        image = self.prepare(image)
        if self.framing != 1.0:
            image = reframe_image(image, self.framing)
        im = Image.fromarray(image)
        if self.resize == "squash":
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), resample, reducing_gap=3.0)
        else:
            short = round(self.size / self.crop_pct)
            w, h = im.size
            scale = short / min(w, h)
            size = (max(short, round(w * scale)), max(short, round(h * scale)))
            if size == (w, h):  # already resized (e.g. early, while decoding): only the centre crop
                left, top = (w - self.size) // 2, (h - self.size) // 2
                return np.ascontiguousarray(image[top:top + self.size, left:left + self.size])
            im = im.resize(size, resample)
            w, h = im.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
        return np.asarray(im, dtype=np.uint8)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """What every image goes through before any framing or resizing (the bars filled when
        ``bars == "fill"``); repeating it changes nothing, so the early resize may run it too."""
        return fill_bars(image) if self.bars == "fill" else image

    @property
    def decode_size(self) -> int:
        """Smallest image side the resize needs: a JPEG may be DCT-scaled down to it on decoding."""
        side = self.size / self.crop_pct if self.resize == "shorter_crop" else self.size
        return round(side / min(1.0, self.framing))

    def early_resizer(self):
        """A resize that may run before this preprocessing (e.g. in a decoding thread) without
        changing the model input, or None when there is none:

        - ``"squash"``, or ``"shorter_crop"`` without cropping: the resize itself (a second
          application leaves a size x size image as it is);
        - ``"shorter_crop"`` with a centre crop: resize the shorter side and crop a square of that
          side, leaving the final crop to the model. Two centre crops compose exactly when the
          margin of the second is even; otherwise there is no early resize.
        """
        if self.framing != 1.0:  # the framing needs the whole decoded image
            return None
        if self.resize == "squash" or self.crop_pct == 1.0:
            return self.resize_image
        short = round(self.size / self.crop_pct)
        if (short - self.size) % 2:
            return None
        from dataclasses import replace

        return replace(self, size=short, crop_pct=1.0).resize_image

    def canonicalise(self, x: np.ndarray, percentiles: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Colour canonicalisation of a float batch (N, H, W, 3) in [0, 1]; returns a new array
        (training applies it to augmented batches, so both paths share this one function).
        ``percentiles``: the batch's :func:`colour_percentiles`, when the caller has them already."""
        if self.colour == "none":
            return x
        ref = np.asarray(self.colour_ref, dtype=np.float32)
        lo, hi = colour_percentiles(x) if percentiles is None else percentiles
        scale = (ref[3:] - ref[:3]) / np.maximum(hi - lo, 1.0 / 255)
        out = (x - lo[:, None, None, :]) * scale[:, None, None, :] + ref[:3]
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    def stained_share(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Share of each image's model input that is stained nucleus (dark, blue above green after
        colour canonicalisation): a cheap, segmentation-free gauge of how much of the frame the
        cell fills. It grows with the square of the zoom, so ``sqrt(share / reference)`` estimates
        how much tighter an image is framed than a reference crop (:class:`ReframeRule`)."""
        if len(images) == 0:
            return np.zeros(0)
        x = np.stack([self.resize_image(im) for im in images]).astype(np.float32) * (1.0 / 255.0)
        lo, hi = colour_percentiles(x)
        x = self.canonicalise(x, (lo, hi))
        green, blue = x[..., 1], x[..., 2]
        share = ((green < NUCLEUS_GREEN) & (blue > green + NUCLEUS_BLUE_OVER_GREEN)).mean(axis=(1, 2))
        # a flat image has no contrast to stretch: canonicalisation maps it all onto the dark reference
        return np.where((hi - lo).max(axis=1) < MIN_CONTRAST, 0.0, share)

    def normalize(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 → (N, 3, H, W) float32 normalised, ready for a model.

        Every output value is a function of its input byte, its channel and (with colour
        canonicalisation) the image's percentiles, so it is computed once per byte value into a
        (N, 3, 256) table and looked up: the same float32 operations as :meth:`normalize_reference`,
        value for value, at a fraction of the cost (the percentiles come from byte histograms).
        """
        batch = np.asarray(batch_uint8)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            return self.normalize_reference(batch)
        n, h, w, _ = batch.shape
        levels = np.arange(256, dtype=np.float32) * (1.0 / 255.0)  # what uint8 * (1/255) gives, exactly
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        if self.colour == "none":
            table = np.broadcast_to((levels[None, :] - mean) / std, (n, 3, 256))
        else:
            ref = np.asarray(self.colour_ref, dtype=np.float32)
            lo, hi = uint8_colour_percentiles(batch)
            scale = (ref[3:] - ref[:3]) / np.maximum(hi - lo, 1.0 / 255)
            table = (levels[None, None, :] - lo[:, :, None]) * scale[:, :, None] + ref[:3][None, :, None]
            np.clip(table, 0.0, 1.0, out=table)
            table = (table.astype(np.float32, copy=False) - mean[None]) / std[None]
        # index of (image, channel, byte) in the flattened table, in NCHW order
        index = batch.transpose(0, 3, 1, 2).astype(np.int32)
        index += _table_offsets(n)[:, :, None, None]
        return np.take(np.ascontiguousarray(table, dtype=np.float32).reshape(-1), index)

    def normalize_reference(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`normalize` computed pixel by pixel in float32 (any numeric input in 0-255)."""
        x = self.canonicalise(np.asarray(batch).astype(np.float32) * (1.0 / 255.0))
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Images of any size → one float32 batch (N, 3, size, size)."""
        if len(images) == 0:
            return np.zeros((0, 3, self.size, self.size), dtype=np.float32)
        return self.normalize(np.stack([self.resize_image(im) for im in images]))


COLOUR_MODES = ("none", "percentile")
BAR_MODES = ("keep", "fill")
#: An edge row or column is a bar when at least this share of its pixels is near-black (:data:`DARK`).
BAR_SHARE = 0.9
#: A canonicalised pixel is stained nucleus (Romanowsky purple) when green is below this and blue
#: exceeds green by the next: PBC's crops hold a median 7 % of such pixels, crops cut to their
#: centre 50 % / 40 % 25 % / 37 % (docs/crosslab.md).
NUCLEUS_GREEN = 0.35
NUCLEUS_BLUE_OVER_GREEN = 0.1
#: Below this spread of its 1st-99th percentiles (any channel) an image holds no cell to measure.
MIN_CONTRAST = 0.05
#: Pixels whose brightest channel is below this are padding or bars, not stain: they do not
#: count towards the colour percentiles.
DARK = 0.08
PERCENTILES = (1.0, 99.0)


def colour_percentiles(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-channel 1st / 99th percentiles of a float batch (N, H, W, 3) in [0, 1],
    over the pixels (of a 2x2 subgrid) that are not near-black (all of them when fewer than
    1 % are left).

    Returns:
        (lo, hi), each (N, 3) float32.
    """
    n = x.shape[0]
    flat = x[:, ::2, ::2].reshape(n, -1, 3)  # every other row and column: 4x faster, same percentiles ± noise
    keep = flat.max(axis=2) >= DARK
    lo, hi = np.empty((n, 3), np.float32), np.empty((n, 3), np.float32)
    for i in range(n):
        px = flat[i][keep[i]] if keep[i].sum() >= 0.01 * flat.shape[1] else flat[i]
        lo[i], hi[i] = np.percentile(px, PERCENTILES, axis=0)
    return lo, hi


def uint8_colour_percentiles(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`colour_percentiles` of ``batch.astype(float32) / 255`` for a uint8 batch (N, H, W, 3),
    with the same values, from per-image byte histograms instead of sorting each image."""
    n = batch.shape[0]
    levels = np.arange(256, dtype=np.float32) * (1.0 / 255.0)
    sub = np.ascontiguousarray(batch[:, ::2, ::2]).reshape(n, -1, 3)
    p = sub.shape[1]
    brightest = np.maximum(np.maximum(sub[..., 0], sub[..., 1]), sub[..., 2])
    keep = brightest >= int(np.argmax(levels >= DARK))  # the first byte whose level is >= DARK
    enough = keep.sum(1) >= 0.01 * p
    keep |= ~enough[:, None]  # too few bright pixels: all of them count, as in colour_percentiles
    key = sub.astype(np.int32)
    key += _table_offsets(n)[:, None, :]
    key[~keep] = n * 3 * 256  # pixels that do not count go to one extra bin, dropped below
    counts = np.bincount(key.ravel(), minlength=n * 3 * 256 + 1)[:-1].reshape(n, 3, 256)
    cum = np.cumsum(counts, axis=2)  # (n, 3, 256)
    m = cum[:, :, -1].astype(np.float64)  # pixels counted per image (same for the 3 channels)
    out = []
    for q in PERCENTILES:
        # numpy's default ("linear") percentile: position (m - 1) q / 100 between sorted values
        pos = (m - 1) * (q / 100.0)
        below = np.floor(pos)
        t = pos - below
        a = levels[_rank_value(cum, below)]
        b = levels[_rank_value(cum, np.minimum(below + 1, m - 1))]
        out.append(_lerp(a, b, t).astype(np.float32))
    return out[0], out[1]


def _table_offsets(n: int) -> np.ndarray:
    """(n, 3) int32: where image i, channel c starts in a flattened (n, 3, 256) table."""
    return ((np.arange(n, dtype=np.int32)[:, None] * 3 + np.arange(3, dtype=np.int32)[None, :]) * 256)


def _rank_value(cum: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Byte value at 0-based sorted position ``rank`` (n, 3) given cumulative histograms (n, 3, 256)."""
    return (cum <= rank[:, :, None]).sum(axis=2)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's percentile interpolation, operation for operation (``numpy.lib._function_base_impl._lerp``)."""
    diff = np.subtract(b, a)
    out = np.asarray(np.add(a, diff * t))
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
    return out


def colour_reference(images: np.ndarray) -> list[float]:
    """The ``colour_ref`` of a set of uint8 images (N, H, W, 3): medians of their percentiles."""
    lo, hi = colour_percentiles(np.asarray(images, dtype=np.float32) / 255.0)
    return [round(float(v), 5) for v in (*np.median(lo, 0), *np.median(hi, 0))]


#: Numbers of test-time views: the first n of identity, h-flip, rot90, rot90+h-flip, ... (the
#: 8 symmetries of the square; a smear has no "up", so each view is an equally valid image).
TTA_VIEWS = (1, 2, 4, 8)


def dihedral_views(x: np.ndarray, n: int) -> list[np.ndarray]:
    """The first ``n`` flip/rot90 views of an NCHW batch, each a contiguous array.

    Raises:
        ValueError: ``n`` not in :data:`TTA_VIEWS`.
    """
    if n not in TTA_VIEWS:
        raise ValueError(f"test-time views must be one of {TTA_VIEWS}; got {n}")
    views = []
    for k in range(4):
        rotated = np.rot90(x, k, axes=(2, 3))
        views += [rotated, rotated[..., ::-1]]
    return [np.ascontiguousarray(v) for v in views[:n]]


def centre_crop(image: np.ndarray, share: float) -> np.ndarray:
    """The centre of an HWC image, ``share`` of each side (at least 1 px), as a view."""
    h, w = image.shape[:2]
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]


#: Colour changes :func:`recolour_image` makes (the framing search's ``ReframeRule.colours``).
Recolour = Literal["saturation", "gamma"]
RECOLOURS: tuple[str, ...] = get_args(Recolour)


def recolour_image(image: np.ndarray, kind: str, factor: float) -> np.ndarray:
    """An HWC uint8 RGB image with its colour changed in a way the per-channel colour
    canonicalisation cannot undo: ``saturation`` scales each pixel's distance from its grey
    (channel mean) by ``factor``; ``gamma`` raises intensities in [0, 1] to ``factor``."""
    x = image.astype(np.float32)
    if kind == "saturation":
        grey = x.mean(axis=-1, keepdims=True)
        x = grey + factor * (x - grey)
    elif kind == "gamma":
        x = 255.0 * (x * (1.0 / 255.0)) ** factor
    else:
        raise ValueError(f"unknown colour change {kind!r}; expected one of {RECOLOURS}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def fill_bars(image: np.ndarray) -> np.ndarray:
    """An HWC uint8 RGB image with the near-black bars along its edges painted with its white
    point (the 99th percentile of each channel of the rest); the image itself when it has none.

    Edge rows and columns are peeled off while :data:`BAR_SHARE` of their pixels (within what is
    left) are near-black, so a corner block (rows at the top, then columns at a side) goes too;
    dark pixels inside the image (a nucleus) are never touched. On LISC's crops, 258 of 1,218
    have such bars (their crops cut at the slide image's border); PBC's 13,726 have none
    (docs/crosslab.md).
    """
    if image.ndim != 3 or image.shape[0] < 2 or image.shape[1] < 2:
        return image
    level = round(DARK * 255)
    # every image passes here (twice with the early resize): its edges alone decide most of them
    if not any((edge.max(axis=-1) < level).any() for edge in (image[0], image[-1], image[:, 0], image[:, -1])):
        return image
    dark = image.max(axis=2) < level
    top, bottom, left, right = 0, dark.shape[0], 0, dark.shape[1]
    peeled = True
    while peeled and top < bottom and left < right:
        peeled = False
        if dark[top, left:right].mean() >= BAR_SHARE:
            top, peeled = top + 1, True
        if top < bottom and dark[bottom - 1, left:right].mean() >= BAR_SHARE:
            bottom, peeled = bottom - 1, True
        if top < bottom and dark[top:bottom, left].mean() >= BAR_SHARE:
            left, peeled = left + 1, True
        if top < bottom and left < right and dark[top:bottom, right - 1].mean() >= BAR_SHARE:
            right, peeled = right - 1, True
    if (top, bottom, left, right) == (0, dark.shape[0], 0, dark.shape[1]) or top >= bottom or left >= right:
        return image  # no bars, or nothing but bars (a black image is left to the OOD flag)
    inner = image[top:bottom, left:right]
    out = np.empty_like(image)
    out[:] = white_point(inner)
    out[top:bottom, left:right] = inner
    return out


def white_point(image: np.ndarray) -> np.ndarray:
    """The slide background's colour in an HWC (or HW) image: each channel's 99th percentile
    over every 4th pixel, in the image's dtype."""
    sample = image[::4, ::4].reshape(-1, image.shape[-1]) if image.ndim == 3 else image[::4, ::4].reshape(-1)
    return np.percentile(sample, 99, axis=0).astype(image.dtype)


def reframe_image(image: np.ndarray, share: float) -> np.ndarray:
    """An HWC image seen at ``share`` of its side: below 1 its centre (:func:`centre_crop`),
    above 1 the image in the middle of a frame ``share`` times its size, filled with the image's
    white point (the 99th percentile of each channel, on every 4th pixel: the slide's background
    wherever the crop shows any). The border's colour would be the cell's own in a crop cut
    through the cell (PBC cells cut to their centre 30 %: 69 % right as is with that fill, 76 %
    with the white point; docs/crosslab.md)."""
    if share == 1.0:
        return image
    if share < 1.0:
        return centre_crop(image, share)
    h, w = image.shape[:2]
    ph, pw = round(h * (share - 1) / 2), round(w * (share - 1) / 2)
    out = np.empty((h + 2 * ph, w + 2 * pw) + image.shape[2:], image.dtype)
    out[:] = white_point(image)
    out[ph:ph + h, pw:pw + w] = image
    return out
