"""Model bundles: one directory format and one runtime for every kind of learner.

A bundle is a directory (or its zip) with ``config.json`` (:mod:`.config`), metrics, a model card,
weights and an optional OOD scorer (see docs/bundle.md). :func:`load_bundle` checks the format
version and builds the class registered for the config's ``kind``; everything downstream
(predict, evaluate, serve, export, trust, explain) talks to :class:`Bundle` and asks it rather
than asking which learner made it: ``predict`` / ``iter_predictions`` (threaded decoding),
``forward_views`` and ``max_views``, ``backends`` / ``use_backend``, ``explainer(method)``,
``torch_module()``, ``save(path)`` (the one way to disk, rewriting only changed files).

The package stands alone: it imports ``data`` and ``models`` below it, never a workflow above it
(import-linter contracts in pyproject.toml). Modules:

- :mod:`.base`: the :class:`Bundle` interface, loading and saving, the kind and explainer registries
- :mod:`.config`: :class:`BundleConfig` and its typed sections
- :mod:`.ood`: out-of-distribution scorers (registry, built-ins, loading); fitted by ``hematoscope.trust``
- :mod:`.neural`, with its runners :mod:`.neural_torch` (PyTorch) and :mod:`.neural_onnx` (ONNX Runtime)
- :mod:`.prediction`: :class:`Prediction`, :class:`Explanation`, the differential count
- :mod:`.card`, :mod:`.adapt`, :mod:`.default` (the shipped model's path)
"""
from hematoscope.bundle.base import (
    Bundle,
    BundleError,
    ModelOutput,
    ViewOutputs,
    bundle_class,
    load_bundle,
    register_bundle_kind,
    register_explainer,
)
from hematoscope.bundle.config import BundleConfig
from hematoscope.bundle.prediction import DifferentialCount, Explanation, Prediction, SkippedFile

__all__ = [
    "Bundle", "BundleConfig", "BundleError", "DifferentialCount", "Explanation", "ModelOutput", "Prediction",
    "SkippedFile", "ViewOutputs", "bundle_class", "load_bundle", "register_bundle_kind", "register_explainer",
]
