"""Fixtures for the predict tests: a fast torch-free bundle and folders with bad files."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematoscope.bundle.base import Bundle, BundleConfig, ModelOutput
from hematoscope.models.preprocess import Preprocess


class ColourBundle(Bundle):
    """Logits = the mean of each normalised colour channel: fast, deterministic, no torch, so
    pipeline tests measure the pipeline and not a network."""

    def forward(self, images):
        x = self.preprocess(images)
        logits = x.mean(axis=(2, 3))
        return ModelOutput(logits, logits)

    def _save_weights(self, directory):  # nothing to save
        pass

    @classmethod
    def _load_weights(cls, config, directory, metrics):
        return cls(config, metrics)


def make_colour_bundle(size: int = 32) -> ColourBundle:
    config = BundleConfig(kind="colour", name="colour", labels=["erythroblast", "lymphocyte", "neutrophil"],
                          preprocess=Preprocess(size=size).to_dict())
    return ColourBundle(config)


@pytest.fixture
def colour_bundle() -> ColourBundle:
    return make_colour_bundle()


@pytest.fixture
def colour_bundle_128() -> ColourBundle:
    """The colour bundle with a 128 px input: each decoded image costs 48 KB of memory."""
    return make_colour_bundle(128)


def encode(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def colour_image(channel: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """An image dominated by one RGB channel (so ColourBundle's answer is known)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size + 4, 3), dtype=np.uint8)
    img[..., channel] = 220
    return img


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """6 good images (2 per colour, nested), plus a truncated JPEG, an empty PNG and a text file
    with an image extension, and a notes.txt that must be ignored."""
    root = tmp_path / "messy"
    for i in range(6):
        sub = root / "a" if i < 3 else root / "b" / "deep"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"cell_{i}.jpg").write_bytes(encode(colour_image(i % 3, seed=i)))
    (root / "a" / "truncated.jpg").write_bytes(encode(colour_image(0, size=200))[:300])
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("not an image at all")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture
def messy_zip(messy_folder, tmp_path) -> Path:
    """The messy folder as a zip (with a __MACOSX resource fork to ignore)."""
    path = tmp_path / "cells.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(messy_folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(messy_folder).as_posix())
        zf.writestr("__MACOSX/a/._cell_0.jpg", b"\x00\x05\x16\x07 resource fork")
    return path


@pytest.fixture
def images():
    """Helpers for tests that make their own files: ``images.colour(channel, size, seed)`` and
    ``images.encode(array, fmt)`` (importing from conftest is not possible in importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(colour=colour_image, encode=encode)
