"""Model bundles: one directory format for every kind of learner (see :mod:`.base`)."""
from hematoscope.bundle.base import (
    Bundle,
    BundleConfig,
    BundleError,
    ModelOutput,
    bundle_class,
    load_bundle,
    register_bundle_kind,
)
from hematoscope.bundle.prediction import DifferentialCount, Prediction, SkippedFile

__all__ = [
    "Bundle", "BundleConfig", "BundleError", "ModelOutput", "bundle_class", "load_bundle",
    "register_bundle_kind", "DifferentialCount", "Prediction", "SkippedFile",
]
