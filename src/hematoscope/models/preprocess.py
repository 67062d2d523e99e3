"""The preprocessing spec that travels with every model: training, evaluation, predict, ONNX
and the web app all build their input from this one object, so they cannot drift apart."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


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
    """

    size: int = 128
    resize: str = "squash"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    colour: str = "none"
    colour_ref: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"input size must be >= 8 px; got {self.size}")
        if self.resize not in ("squash", "shorter_crop"):
            raise ValueError(f"resize must be 'squash' or 'shorter_crop'; got {self.resize!r}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.1, 1]; got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}; got {self.interpolation!r}")
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
        im = Image.fromarray(image)
        if self.resize == "squash":
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), resample, reducing_gap=3.0)
        else:
            short = round(self.size / self.crop_pct)
            w, h = im.size
            scale = short / min(w, h)
            im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample)
            w, h = im.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
        return np.asarray(im, dtype=np.uint8)

    @property
    def decode_size(self) -> int:
        """Smallest image side the resize needs: a JPEG may be DCT-scaled down to it on decoding."""
        return round(self.size / self.crop_pct) if self.resize == "shorter_crop" else self.size

    def early_resizer(self):
        """A resize that may run before this preprocessing (e.g. in a decoding thread) without
        changing the model input, or None when there is none:

        - ``"squash"``, or ``"shorter_crop"`` without cropping: the resize itself (a second
          application leaves a size x size image as it is);
        - ``"shorter_crop"`` with a centre crop: resize the shorter side and crop a square of that
          side, leaving the final crop to the model. Two centre crops compose exactly when the
          margin of the second is even; otherwise there is no early resize.
        """
        if self.resize == "squash" or self.crop_pct == 1.0:
            return self.resize_image
        short = round(self.size / self.crop_pct)
        if (short - self.size) % 2:
            return None
        from dataclasses import replace

        return replace(self, size=short, crop_pct=1.0).resize_image

    def canonicalise(self, x: np.ndarray) -> np.ndarray:
        """Colour canonicalisation of a float batch (N, H, W, 3) in [0, 1]; returns a new array
        (training applies it to augmented batches, so both paths share this one function)."""
        if self.colour == "none":
            return x
        ref = np.asarray(self.colour_ref, dtype=np.float32)
        lo, hi = colour_percentiles(x)
        scale = (ref[3:] - ref[:3]) / np.maximum(hi - lo, 1.0 / 255)
        out = (x - lo[:, None, None, :]) * scale[:, None, None, :] + ref[:3]
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    def normalize(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 → (N, 3, H, W) float32 normalised, ready for a model."""
        x = self.canonicalise(batch_uint8.astype(np.float32) * (1.0 / 255.0))
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Images of any size → one float32 batch (N, 3, size, size)."""
        if len(images) == 0:
            return np.zeros((0, 3, self.size, self.size), dtype=np.float32)
        return self.normalize(np.stack([self.resize_image(im) for im in images]))


COLOUR_MODES = ("none", "percentile")
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
