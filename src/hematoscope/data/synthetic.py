"""Synthetic cell-like images for tests and for an offline demo when no real data is around.

Each image shows a pale slide background with a few red-cell discs and one centred, stained
"white cell" whose cytoplasm colour/size and nucleus shape depend on the class (round, bilobed,
multilobed, kidney, dense round, or a tiny platelet fragment), with random size, position,
rotation, noise and blur. Images are deterministic given the seed.

These images only exercise code paths; they are never a stand-in for real data in any reported
number.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

#: The class folders of the PBC dataset (Acevedo et al. 2020), the default class list.
PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")

_NUCLEUS_SHAPES = ("round", "bilobed", "multilobed", "kidney", "dense", "fragment", "granular")


@dataclass(frozen=True)
class _Look:
    """How one class is drawn. Radii are fractions of the image size; colours are RGB."""

    cytoplasm: tuple[int, int, int]
    cell_radius: float
    nucleus: str
    nucleus_color: tuple[int, int, int]
    nucleus_scale: float  # nucleus size relative to the cell radius


_LOOKS = {
    "basophil": _Look((150, 110, 170), 0.26, "granular", (70, 30, 100), 0.75),
    "eosinophil": _Look((235, 140, 100), 0.31, "bilobed", (110, 50, 140), 0.55),
    "erythroblast": _Look((175, 165, 205), 0.20, "dense", (45, 20, 70), 0.70),
    "ig": _Look((200, 175, 215), 0.33, "kidney", (120, 70, 160), 0.65),
    "lymphocyte": _Look((140, 175, 225), 0.22, "round", (85, 45, 135), 0.85),
    "monocyte": _Look((185, 185, 210), 0.36, "kidney", (140, 100, 175), 0.60),
    "neutrophil": _Look((230, 200, 212), 0.30, "multilobed", (100, 50, 145), 0.50),
    "platelet": _Look((160, 120, 185), 0.07, "fragment", (110, 60, 150), 1.0),
}
# Other spellings used by other datasets' folders draw like their PBC counterpart.
_ALIASES = {"immature_granulocyte": "ig", "neutrophil_segmented": "neutrophil", "neutrophil_band": "neutrophil"}


def _look_for(label: str) -> _Look:
    key = label.lower()
    key = _ALIASES.get(key, key)
    if key in _LOOKS:
        return _LOOKS[key]
    # Unknown class: a stable, label-derived look, so any class list gives separable images.
    r = np.random.default_rng(zlib.crc32(label.encode()))
    return _Look(
        tuple(int(v) for v in r.integers(110, 240, 3)),
        float(r.uniform(0.15, 0.36)),
        _NUCLEUS_SHAPES[int(r.integers(len(_NUCLEUS_SHAPES)))],
        tuple(int(v) for v in r.integers(30, 150, 3)),
        float(r.uniform(0.5, 0.85)),
    )


def synthetic_cell(label: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draw one cell-like image of class ``label``.

    Args:
        label: class name; the 8 PBC classes (and their canonical spellings) have hand-made
            looks, any other name gets a stable look derived from the name.
        rng: random generator (all randomness comes from it).
        size: side of the square image in pixels.

    Returns:
        RGB ``uint8`` array of shape (size, size, 3).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    look = _look_for(label)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    img = np.empty((size, size, 3))
    img[:] = np.array([238, 228, 232]) + rng.normal(0, 4, 3)

    # Red cells: pink discs with a paler centre, scattered (may sit under the white cell).
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.10, 0.15)
        d = np.hypot(xx - cx, yy - cy)
        disc = _soft(r - d)
        pallor = _soft(0.45 * r - d)
        rbc = np.array([222, 150, 155]) + rng.normal(0, 6, 3)
        img = _blend(img, rbc, disc * (1 - 0.5 * pallor))

    cx, cy = size / 2 + rng.normal(0, size * 0.04, 2)
    angle = rng.uniform(0, 2 * np.pi)
    scale = rng.uniform(0.85, 1.15)
    radius = look.cell_radius * size * scale
    # Coordinates in the cell's rotated frame, in units of the cell radius.
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / radius
    px = radius  # pixels per unit, to make mask edges about one pixel soft

    cyto = np.array(look.cytoplasm) + rng.normal(0, 6, 3)
    nuc = np.array(look.nucleus_color) + rng.normal(0, 6, 3)
    if look.nucleus != "fragment":
        ecc = rng.uniform(0.9, 1.1)
        img = _blend(img, cyto, _soft(px * (1 - np.hypot(u * ecc, v / ecc))))
    img = _blend(img, nuc, _nucleus_mask(look.nucleus, u, v, look.nucleus_scale, px, rng))

    img += rng.normal(0, rng.uniform(2, 6), img.shape)
    out = np.clip(img, 0, 255).round().astype(np.uint8)
    from PIL import Image, ImageFilter

    blur = rng.uniform(0.0, 0.8)
    return np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(blur))) if blur > 0.2 else out


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    """0..1 coverage from a signed distance in pixels (positive inside), anti-aliased."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _blend(img: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return img * (1 - alpha[..., None]) + color * alpha[..., None]


def _disc(u: np.ndarray, v: np.ndarray, cu: float, cv: float, r: float, px: float) -> np.ndarray:
    return _soft(px * (r - np.hypot(u - cu, v - cv)))


def _nucleus_mask(shape: str, u, v, s: float, px: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage of the nucleus in the cell frame (unit = cell radius, ``s`` = relative size)."""
    if shape in ("round", "dense"):
        return _disc(u, v, rng.normal(0, 0.05), rng.normal(0, 0.05), s, px)
    if shape == "bilobed":
        off = s * 0.75
        return np.maximum(_disc(u, v, -off, 0, s * 0.62, px), _disc(u, v, off, 0, s * 0.62, px))
    if shape == "multilobed":
        n = int(rng.integers(3, 6))
        mask = np.zeros_like(u)
        for t in np.linspace(-1.1, 1.1, n):  # lobes along a curved band
            mask = np.maximum(mask, _disc(u, v, 1.1 * s * np.sin(t), 0.6 * s * np.cos(t) - 0.3 * s, 0.42 * s, px))
        return mask
    if shape == "kidney":
        body = _soft(px * (s - np.hypot(u / 1.25, v)))
        notch = _disc(u, v, 0, s * 1.05, s * 0.55, px)
        return body * (1 - notch)
    if shape == "granular":  # dark nucleus hidden under coarse dark granules
        mask = _disc(u, v, 0, 0, s * 0.7, px)
        for _ in range(25):
            a, r = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * 0.95
            mask = np.maximum(mask, _disc(u, v, r * np.cos(a), r * np.sin(a), 0.13, px))
        return mask
    if shape == "fragment":  # a small irregular cluster of granules, no cytoplasm disc
        mask = np.zeros_like(u)
        for _ in range(int(rng.integers(3, 7))):
            mask = np.maximum(mask, _disc(u, v, *rng.normal(0, 0.45, 2), rng.uniform(0.35, 0.6), px))
        return mask
    raise ValueError(f"unknown nucleus shape {shape!r}")


def make_synthetic_dataset(
    root: Path | str,
    *,
    classes: Sequence[str] | None = None,
    n_per_class: int = 10,
    size: int = 64,
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """Write a class-per-folder tree ``root/<class>/<class>_<i>.<fmt>`` of synthetic cells.

    Deterministic: the same arguments give the same pixels; each class has its own random
    stream, so adding a class does not change the images of the others.

    Args:
        root: output folder (created; existing files with the same names are replaced).
        classes: class names; default the 8 PBC folder names.
        n_per_class: images per class.
        size: image side in pixels.
        seed: random seed.
        fmt: image format / extension understood by Pillow ("png", "jpg", "bmp", "tiff").

    Returns:
        ``root`` as a Path.
    """
    from PIL import Image

    classes = list(PBC_CLASSES if classes is None else classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be non-empty and unique, got {classes}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    root = Path(root)
    ext = fmt.lower().lstrip(".")
    for label in classes:
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(synthetic_cell(label, rng, size)).save(folder / f"{label}_{i:04d}.{ext}")
    return root
