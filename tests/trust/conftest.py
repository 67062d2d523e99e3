"""A toy bundle kind for trust tests: nearest-centroid on colour statistics, so fitting and
scoring take milliseconds while going through the real Bundle decide/save/load code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hematoscope.bundle.base import Bundle, BundleConfig, ModelOutput, register_bundle_kind
from hematoscope.models.preprocess import Preprocess

#: Mean RGB colour of each toy class (images are noisy flat patches of these colours).
TOY_COLOURS = {"basophil": (120, 60, 160), "lymphocyte": (200, 120, 170), "neutrophil": (220, 180, 200)}


def colour_features(images) -> np.ndarray:
    """Mean and standard deviation of each channel, scaled to about [0, 1]."""
    x = np.stack([np.asarray(im, dtype=np.float64).reshape(-1, 3) for im in images])
    return np.concatenate([x.mean(1), x.std(1)], 1) / 255.0


@register_bundle_kind("trust-toy")
class ToyBundle(Bundle):
    """Logits = -20 * squared distance of the colour features to each class centroid."""

    def __init__(self, config, metrics=None, path=None, centroids=None):
        super().__init__(config, metrics, path)
        self.centroids = centroids

    @classmethod
    def create(cls, with_features: bool = True) -> "ToyBundle":
        config = BundleConfig(kind="trust-toy", labels=list(TOY_COLOURS), name="toy",
                              preprocess=Preprocess(size=32).to_dict(), model={"features": with_features})
        return cls(config)

    def fit(self, images, y) -> "ToyBundle":
        f = colour_features(images)
        self.centroids = np.stack([f[y == c].mean(0) for c in range(len(self.labels))])
        return self

    def forward(self, images):
        f = colour_features(images)
        logits = -20 * ((f[:, None, :] - self.centroids[None]) ** 2).sum(-1) * 50
        return ModelOutput(logits, f if self.config.model.features else None)

    def _save_weights(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"centroids": self.centroids}, str(directory / "toy.safetensors"))

    @classmethod
    def _load_weights(cls, config, directory, metrics):
        from safetensors.numpy import load_file

        return cls(config, metrics, centroids=load_file(str(directory / "toy.safetensors"))["centroids"])


def toy_images(n_per_class: int, seed: int, noise: float = 25.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Noisy 16 px patches of each class colour; class index labels."""
    rng = np.random.default_rng(seed)
    images, y = [], []
    for c, colour in enumerate(TOY_COLOURS.values()):
        for _ in range(n_per_class):
            shift = rng.normal(0, 12, 3)
            img = np.asarray(colour) + shift + rng.normal(0, noise, (16, 16, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            y.append(c)
    return images, np.array(y)


def not_cells(n: int, seed: int) -> list[np.ndarray]:
    """Green or black-and-white noise patches: nothing like the toy classes."""
    rng = np.random.default_rng(seed)
    green = [np.clip(np.array([30, 200, 40]) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
             for _ in range(n // 2)]
    bw = [rng.integers(0, 256, (16, 16, 1), dtype=np.uint8).repeat(3, 2) for _ in range(n - n // 2)]
    return green + bw


@pytest.fixture
def toy():
    """(fitted ToyBundle, (train_images, y), (val_images, y), (test_images, y))."""
    train, val, test = toy_images(40, 1), toy_images(30, 2), toy_images(20, 3)
    return ToyBundle.create().fit(*train), train, val, test


@pytest.fixture
def kit():
    """The helpers above, for test modules (importlib mode cannot import conftest directly)."""
    from types import SimpleNamespace

    return SimpleNamespace(ToyBundle=ToyBundle, toy_images=toy_images, not_cells=not_cells)
