"""The default model shipped inside the package (an EfficientNet-Lite0 trained on PBC by
``bench/train_pbc.py``)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


class DefaultModelMissing(FileNotFoundError):
    """The package was installed without its default model bundle."""


def default_bundle_path() -> Path:
    """The directory of the shipped default bundle.

    Raises:
        DefaultModelMissing: the bundle is absent (e.g. a source checkout before
            ``bench/train_pbc.py`` has been run); pass ``--model BUNDLE`` instead.
    """
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise DefaultModelMissing(
            f"the default model is not installed ({DEFAULT_MODEL_DIR} has no config.json); "
            "pass a bundle with --model, or train one: python bench/train_pbc.py")
    return DEFAULT_MODEL_DIR


def load_default_bundle():
    """Load the shipped default bundle (see :func:`default_bundle_path`)."""
    from hematoscope.bundle import load_bundle

    return load_bundle(default_bundle_path())
