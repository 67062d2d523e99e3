"""Shared fixtures. Each tests/<package>/conftest.py adds its own; fixtures used by several
packages live here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The real PBC images (read-only); tests that need them skip when this folder is absent.
PBC_ROOT = Path(os.environ.get("HEMATOSCOPE_PBC", Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"))
#: LISC, the other lab's white-cell crops (read-only; a validation set, never trained on).
LISC_ROOT = Path(os.environ.get("HEMATOSCOPE_LISC", Path(__file__).resolve().parents[2] / "shared" / "data" / "lisc"))


def pytest_configure(config):
    # Tests never write into the user's cache or data dirs.
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="hematoscope-tests-"))
    os.environ.setdefault("HEMATOSCOPE_CACHE", str(base / "cache"))
    os.environ.setdefault("HEMATOSCOPE_HOME", str(base / "home"))
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def pbc_root() -> Path:
    if not (PBC_ROOT / "basophil").is_dir():
        pytest.skip(f"real PBC images not found at {PBC_ROOT} (set HEMATOSCOPE_PBC to their folder)")
    return PBC_ROOT


@pytest.fixture(scope="session")
def lisc_root() -> Path:
    if not (LISC_ROOT / "groups.csv").is_file():
        pytest.skip(f"LISC crops not found at {LISC_ROOT} (set HEMATOSCOPE_LISC to their folder)")
    return LISC_ROOT


@pytest.fixture(scope="session")
def pbc_subset(pbc_root, tmp_path_factory) -> Path:
    """A small real-PBC class-per-folder tree (symlinks: 6 images per class), for fast tests."""
    out = tmp_path_factory.mktemp("pbc_subset")
    for cls_dir in sorted(p for p in pbc_root.iterdir() if p.is_dir()):
        files = sorted(f for f in cls_dir.iterdir() if f.suffix == ".jpg" and not f.name.startswith("."))[:6]
        (out / cls_dir.name).mkdir()
        for f in files:
            (out / cls_dir.name / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A generated class-per-folder tree: the 8 PBC class names × 12 synthetic 64 px PNGs."""
    from hematoscope.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_per_class=12, size=64, seed=0)


#: Canonical labels of the 8 PBC classes, in the order the tiny bundle uses.
PBC_LABELS = ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
              "neutrophil", "platelet"]


@pytest.fixture(scope="session")
def tiny_neural_bundle(tmp_path_factory) -> Path:
    """Path of a small saved neural bundle: EfficientNet-Lite0 (offline ImageNet backbone, fresh
    8-class PBC head, untrained), 64 px input. Load it with ``hematoscope.load_bundle``."""
    import torch

    from hematoscope.bundle.neural import NeuralBundle
    from hematoscope.models.preprocess import Preprocess

    torch.manual_seed(0)
    bundle = NeuralBundle.create(PBC_LABELS, preprocess=Preprocess(size=64), name="tiny-test")
    return bundle.save(tmp_path_factory.mktemp("tiny_bundle") / "bundle")


@pytest.fixture(scope="session")
def tiny_classical_bundle(pbc_subset, tmp_path_factory) -> Path:
    """Path of a small saved classical bundle (XGBoost on the named features + IsolationForest
    anomaly flag), trained on the real ``pbc_subset`` images (4 train / 2 val per class)."""
    from hematoscope.classical.model import train_classical

    # the folder itself, as the CLI takes it (the API needed a table read first)
    result = train_classical(pbc_subset, val=0.34, seed=0, n_jobs=1, name="tiny-classical",
                             params={"max_depth": 3, "eta": 0.3})
    return result.bundle.save(tmp_path_factory.mktemp("tiny_classical") / "bundle")
