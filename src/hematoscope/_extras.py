"""Optional dependencies: which pip extra brings which library, and one clear error when it is missing.

The base install (``pip install hematoscope``) predicts, evaluates, serves and runs the demo on
ONNX Runtime; PyTorch and the training, explanation and research libraries come with extras
(``pyproject.toml``, README "Install"). Code that needs one of them calls :func:`require` where
it starts, so a user without the extra reads which one to install instead of a traceback::

    torch = require("torch", extra="train", purpose="training")
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

#: The optional extras of pyproject.toml that code may require, and what each is for.
EXTRAS = {
    "train": "PyTorch: training, ONNX export, adapt, bundles without model.onnx, timm backbones",
    "classical": "the classical learner (scikit-image features, XGBoost)",
    "explain": "Grad-CAM, LIME and SHAP explanations",
    "research": "self-supervised pretraining and UMAP embeddings",
    "distributed": "batch inference on a Ray cluster",
}


class MissingExtraError(ImportError):
    """A library of an optional extra is not installed; the message names the extra to install."""

    def __init__(self, message: str, *, extra: str, module: str):
        super().__init__(message, name=module)
        self.extra = extra


def install_hint(extra: str) -> str:
    """The commands that install ``extra``: into a source checkout (the project is not on a
    package index) and from a built package (quoted for shells that expand brackets)."""
    return f"bash scripts/setup.sh --extras {extra} (in a source checkout; or pip install 'hematoscope[{extra}]')"


def require(*modules: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import ``modules`` (in order) and return the first; raise :class:`MissingExtraError` naming
    ``extra`` when one is not installed.

    Args:
        modules: import names, e.g. ``"torch"``, ``"pytorch_grad_cam"``.
        extra: the pyproject extra that installs them.
        purpose: what needs them, for the message (e.g. ``"training"``).

    Raises:
        MissingExtraError: a module (or one it imports) is not installed.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as exc:
            missing = exc.name or name
            raise MissingExtraError(
                f"{purpose or 'this'} needs {missing}, which is not installed; it comes with the optional "
                f"'{extra}' extra: {install_hint(extra)}", extra=extra, module=missing) from exc
    return loaded[0]


def available(*modules: str) -> bool:
    """Whether every module in ``modules`` can be imported, without importing it (cheap)."""
    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:  # blocked, as tests do
                return False
            continue
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True
