"""hematoscope: classify microscope images of single blood cells.

The top-level package stays light: heavy libraries (torch, sklearn, xgboost, fastapi) are
imported only inside the modules that use them, so ``hematoscope --help`` is fast. The base
install predicts, evaluates and serves on ONNX Runtime; torch and the training, classical,
explanation, research and Ray libraries are optional extras, and code that needs one calls
:func:`hematoscope._extras.require`, which names the extra to install when it is missing.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version
from typing import TYPE_CHECKING

try:
    __version__ = _version("hematoscope")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

if TYPE_CHECKING:
    from hematoscope.bundle import Bundle


def load_bundle(path) -> "Bundle":
    """Load a model bundle (directory or .zip) of any kind; see :mod:`hematoscope.bundle`."""
    from hematoscope.bundle import load_bundle as _load

    return _load(path)


__all__ = ["__version__", "load_bundle"]
