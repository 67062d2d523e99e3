"""Honestly labelled out-of-distribution test images, made from what is at hand.

Two families, kept apart in reports because they ask different questions:

- **not cells** (``noise``, ``flat``, ``text``, ``fractal``, ``stripes``): images no blood-cell
  classifier should name; a good OOD score flags nearly all of them.
- **corrupted cells** (``blur``, ``overexposed``, ``stain_shift``): real cell images made with
  an out-of-focus lens, a blown-out lamp or a wrong stain. They still show a cell, so flagging
  them is desirable but not always possible; they measure robustness, not "is it a cell".

Every generated folder carries ``ood_manifest.json`` saying what each file is and how it was
made, so the set is never mistaken for labelled cells.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

NOT_CELLS = ("noise", "flat", "text", "fractal", "stripes")
CORRUPTIONS = ("blur", "overexposed", "stain_shift")
#: Mixed sets: one kind per image, cycling through the members.
GROUPS = {"not_cells": NOT_CELLS, "corrupted": CORRUPTIONS}
KINDS = NOT_CELLS + CORRUPTIONS + tuple(GROUPS)

_WORDS = ("sample", "slide 12", "ERROR", "patient", "lorem ipsum", "0.25 mm", "QC", "hematoscope", "label")


def _noise(rng, size, src=None):
    if rng.random() < 0.5:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(20, 70), (size, size, 3)), 0, 255).astype(np.uint8)


def _flat(rng, size, src=None):
    return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()


def _text(rng, size, src=None):
    from PIL import Image, ImageDraw, ImageFont

    bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(10, size // 8))
    for row in range(int(rng.integers(2, 6))):
        y = int(rng.integers(0, size - size // 8))
        draw.text((int(rng.integers(0, size // 3)), y), str(rng.choice(_WORDS)), fill=tuple(int(v) for v in fg),
                  font=font)
    return np.asarray(im)


def _fractal(rng, size, src=None):
    """1/f^beta noise per channel: the power spectrum of natural images (clouds, foliage, rock)."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    radius = np.maximum(np.hypot(fx, fy), 1.0 / size)
    beta = rng.uniform(1.6, 2.4)
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius ** (beta / 2)
        field = np.real(np.fft.ifft2(spectrum))
        channels.append((field - field.min()) / (np.ptp(field) + 1e-12))
    img = np.stack(channels, -1)
    mix = rng.uniform(0.2, 1.0, (3, 3))  # correlated colours, like real scenes
    img = img @ (mix / mix.sum(0, keepdims=True))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _stripes(rng, size, src=None):
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 20)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    if rng.random() < 0.5:
        wave = np.sign(wave)  # hard bars / checker-like
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = ((wave + 1) / 2)[..., None]
    return (a * t + b * (1 - t)).astype(np.uint8)


def _blur(rng, size, src):
    from PIL import Image, ImageFilter

    im = Image.fromarray(src)
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.06, 0.12) * min(im.size))))


def _overexposed(rng, size, src):
    gain = rng.uniform(2.2, 3.5)
    return np.clip(src.astype(np.float64) * gain + rng.uniform(20, 60), 0, 255).astype(np.uint8)


def _stain_shift(rng, size, src):
    from PIL import Image

    hsv = np.asarray(Image.fromarray(src).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(64, 192))) % 256  # hue turned 90-270 degrees
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.3, 2.0), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


_MAKERS: dict[str, Callable] = {"noise": _noise, "flat": _flat, "text": _text, "fractal": _fractal,
                                "stripes": _stripes, "blur": _blur, "overexposed": _overexposed,
                                "stain_shift": _stain_shift}
_HOW = {
    "noise": "uniform or gaussian RGB pixel noise (not a cell)",
    "flat": "one flat random colour (not a cell)",
    "text": "random words drawn with PIL on a flat background (not a cell)",
    "fractal": "1/f^beta coloured noise with natural-image statistics (not a cell)",
    "stripes": "sinusoidal or hard-edged stripes at a random angle (not a cell)",
    "blur": "real cell image, Gaussian blur of radius 6-12 % of its size (out of focus)",
    "overexposed": "real cell image, brightness x2.2-3.5 plus an offset (blown-out lamp)",
    "stain_shift": "real cell image, hue turned 90-270 degrees and saturation x1.3-2 (wrong stain)",
}


def make_ood_set(kind: str, out_dir: Path | str, *, n: int = 100, seed: int = 0, size: int = 128,
                 source: Path | str | None = None) -> list[Path]:
    """Write ``n`` OOD test images of ``kind`` as PNG files into ``out_dir``.

    Args:
        kind: one of :data:`KINDS`: a not-a-cell kind, a corruption, or a group
            (``not_cells`` / ``corrupted``) that cycles through its members.
        out_dir: output folder (created); must not be inside a read-only input data folder.
        n: number of images.
        seed: random seed; the same arguments give the same images.
        size: side of generated images (corruptions keep their source's size).
        source: folder of real cell images (searched recursively), required for corruptions.

    Returns:
        The written files, in order. ``out_dir/ood_manifest.json`` records kind and recipe per file.

    Raises:
        ValueError: unknown kind, ``n < 1``, or a corruption without usable source images.
    """
    from PIL import Image

    from hematoscope._io import atomic_path, write_json
    from hematoscope.data.images import ImageError, is_image_file, load_image

    if kind not in KINDS:
        raise ValueError(f"unknown OOD kind {kind!r}; choose from {', '.join(KINDS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    members = GROUPS.get(kind, (kind,))
    sources: list[Path] = []
    if any(m in CORRUPTIONS for m in members):
        if source is None or not Path(source).is_dir():
            raise ValueError(f"OOD kind {kind!r} corrupts real cell images: give source= a folder of them")
        sources = sorted(p for p in Path(source).rglob("*") if p.is_file() and is_image_file(p)
                         and not p.name.startswith("."))
        if not sources:
            raise ValueError(f"no image files under {source}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources)) if sources else []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, manifest = [], []
    for i in range(n):
        member = members[i % len(members)]
        src_path, src = None, None
        if member in CORRUPTIONS:
            for j in range(len(sources)):  # skip unreadable files, cycling when n > len(sources)
                candidate = sources[order[(i + j) % len(sources)]]
                try:
                    src, src_path = load_image(candidate), candidate
                    break
                except ImageError:
                    continue
            if src is None:
                raise ValueError(f"no readable image files under {source}")
        img = _MAKERS[member](rng, size, src)
        path = out / f"{member}_{i:05d}.png"
        with atomic_path(path, ".png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        written.append(path)
        manifest.append({"file": path.name, "kind": member, "how": _HOW[member],
                         "source": str(src_path) if src_path else None})
    write_json(out / "ood_manifest.json", {"kind": kind, "n": n, "seed": seed, "size": size,
                                           "family": "corrupted cells" if kind in CORRUPTIONS + ("corrupted",)
                                           else "not cells", "images": manifest})
    return written
