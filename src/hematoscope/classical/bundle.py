"""Bundle kind ``classical``: named hand-crafted features → XGBoost.

Files: ``xgboost.json`` (XGBoost's own JSON model format, no pickle) next to the common bundle
files; ``config.model`` records the feature-set version and the feature names in column order,
so a bundle refuses to run with a feature extractor that computes something else.
``forward`` returns log-probabilities as logits and the feature matrix as ``features`` (used by
the ``isolation_forest`` OOD scorer and by the SHAP explanations).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from hematoscope.bundle.base import Bundle, BundleConfig, BundleError, ModelOutput, register_bundle_kind

# Registers the "isolation_forest" OOD method before load_bundle restores the scorer.
import hematoscope.classical.anomaly  # noqa: E402,F401

MODEL_FILE = "xgboost.json"
#: Batches at least this large are featurised by two worker processes.
PARALLEL_MIN_BATCH = 32


def classical_preprocess():
    """The input handling of classical bundles, recorded in ``config.preprocess``: black bars
    along the crop's edges painted as slide background (``bars="fill"``, as the neural default
    does), then the crop resized to the working size (squash, bilinear); nothing is cropped or
    normalised; JPEG files are decoded at full size, so that a file and the same image given as an
    array have the same features. Training features and predictions both decode files with it
    (``load_model_image``); bundles saved before bars were filled, or before full-size decoding,
    keep theirs as they are."""
    from hematoscope.classical.segment import WORK_SIZE
    from hematoscope.models.preprocess import Preprocess

    return Preprocess(size=WORK_SIZE, resize="squash", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bars="fill",
                      jpeg_draft=False)


@register_bundle_kind("classical")
class ClassicalBundle(Bundle):
    """An XGBoost classifier over :data:`hematoscope.classical.features.FEATURES`.

    Args:
        config: bundle config; ``config.model`` holds ``feature_version`` and ``feature_names``.
        booster: the trained ``xgboost.Booster`` (multi:softprob over ``config.labels``).
        metrics: metrics dict.
    """

    explanation_methods = ("segmentation",)
    weight_files = (MODEL_FILE,)

    def __init__(self, config: BundleConfig, booster, metrics: dict | None = None, path: Path | None = None):
        super().__init__(config, metrics, path)
        from hematoscope.classical.features import FEATURE_NAMES, FEATURE_VERSION

        version = config.model.feature_version
        if version != FEATURE_VERSION or config.model.feature_names != FEATURE_NAMES:
            raise BundleError(
                f"classical bundle {config.name!r} was trained on feature set v{version}; this hematoscope "
                f"computes v{FEATURE_VERSION} ({len(FEATURE_NAMES)} features): retrain it with "
                "`hematoscope classical train`")
        self.booster = booster

    @property
    def feature_names(self) -> list[str]:
        return list(self.config.model.feature_names)

    def feature_unit(self, name: str) -> str:
        """The unit of feature ``name`` (for explanations)."""
        from hematoscope.classical.features import feature_spec

        return feature_spec(name).unit

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The (N, D) feature matrix of RGB uint8 images, each first resized by the bundle's
        preprocessing (a no-op for images decoded by ``load_model_image``, as at training)."""
        from hematoscope.classical.features import ClassicalFeatures

        images = [self.preprocess.resize_image(im) for im in images]
        n_jobs = 2 if len(images) >= PARALLEL_MIN_BATCH else 1
        return ClassicalFeatures(n_jobs=n_jobs, cache=False).transform(images)

    def logits_of(self, features: np.ndarray) -> np.ndarray:
        """Log-probabilities (N, C) from a feature matrix."""
        import xgboost as xgb

        margin = self.booster.predict(xgb.DMatrix(features, feature_names=self.feature_names), output_margin=True)
        from scipy.special import log_softmax

        margin = margin.reshape(len(features), len(self.labels)).astype(np.float64)
        return log_softmax(margin, axis=1).astype(np.float32)

    def forward(self, images: Sequence[np.ndarray]) -> ModelOutput:
        feats = self.features(images)
        return ModelOutput(self.logits_of(feats), feats)

    def _save_weights(self, directory: Path) -> None:
        self.booster.save_model(str(Path(directory) / MODEL_FILE))

    @classmethod
    def _load_weights(cls, config: BundleConfig, directory: Path, metrics: dict) -> "ClassicalBundle":
        from hematoscope._extras import require

        xgb = require("xgboost", "skimage", extra="classical", purpose="a classical bundle")
        path = Path(directory) / MODEL_FILE
        if not path.exists():
            raise BundleError(f"{directory} has no {MODEL_FILE}: the classical bundle is incomplete")
        booster = xgb.Booster()
        try:
            booster.load_model(str(path))
        except xgb.core.XGBoostError as exc:
            raise BundleError(f"{path} is not a readable XGBoost model ({exc})") from None
        booster.set_param({"nthread": 1})  # prediction batches are small; extra threads only contend
        return cls(config, booster, metrics)
