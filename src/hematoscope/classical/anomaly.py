"""IsolationForest anomaly scorer on the classical features, registered as the
``isolation_forest`` OOD method of :mod:`hematoscope.trust`.

A fitted ``IsolationForest`` cannot be saved without pickle, so the scorer stores what it was
fitted on (a seeded subset of the training features, in ``ood.safetensors``) and its parameters
(in ``config.ood``) and refits at load time. Fitting on a few thousand rows takes well under a
second and, with the same data, parameters and ``random_state``, gives identical scores.

Missing features (segmentation failed, no cytoplasm) are replaced by a value below the training
range of that feature, so an image whose cell cannot be found is *unlike* the typical training
cell rather than silently looking average.
"""
from __future__ import annotations

import numpy as np

from hematoscope.bundle.ood import OODScorer, ScorerError, register_scorer


@register_scorer("isolation_forest")
class IsolationForestScorer(OODScorer):
    """Anomaly score ``-IsolationForest.score_samples`` (higher = more anomalous) [0].

    Args:
        n_estimators: trees in the forest.
        max_samples: rows drawn per tree.
        max_train: at most this many training rows are kept (seeded random subset).
        seed: ``random_state`` of both the subset and the forest.

    [0] Liu, Ting & Zhou, "Isolation Forest", ICDM 2008 (scikit-learn's implementation).
    """

    needs_features = True
    array_names = ("bank",)

    def __init__(self, n_estimators: int = 200, max_samples: int = 256, max_train: int = 4000, seed: int = 0):
        super().__init__()
        self.n_estimators, self.max_samples = int(n_estimators), int(max_samples)
        self.max_train, self.seed = int(max_train), int(seed)
        self.bank_: np.ndarray | None = None
        self._forest = None
        self._fill: np.ndarray | None = None

    def fit(self, features, labels=None, logits=None):
        """Fit on in-distribution training features (N, D), NaN allowed; returns self."""
        x = self._check_features(features)
        if len(x) > self.max_train:
            x = x[np.sort(np.random.default_rng(self.seed).choice(len(x), self.max_train, replace=False))]
        if len(x) < 2:
            raise ScorerError(f"isolation_forest needs at least 2 training rows, got {len(x)}")
        self.bank_ = x.astype(np.float32)
        self._refit()
        return self

    def _refit(self) -> None:
        import warnings

        from sklearn.ensemble import IsolationForest

        bank = self.bank_.astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            lo, hi = np.nanmin(bank, 0), np.nanmax(bank, 0)
        span = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
        self._fill = np.where(np.isfinite(lo), lo - span - 1.0, 0.0)
        self._forest = IsolationForest(n_estimators=self.n_estimators, max_samples=min(self.max_samples, len(bank)),
                                       random_state=self.seed, n_jobs=1).fit(self._impute(bank))

    def _impute(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.where(np.isnan(x), self._fill, x)

    def _check_features(self, features) -> np.ndarray:
        if features is None:
            raise ScorerError("the isolation_forest scorer needs the classical feature vector, but the model gave none")
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ScorerError(f"features must be 2-D (N, D); got shape {x.shape}")
        if self.bank_ is not None and x.shape[1] != self.bank_.shape[1]:
            raise ScorerError(f"features have {x.shape[1]} columns; the scorer was fitted on {self.bank_.shape[1]}")
        return x

    def score(self, *, features, logits=None):
        """(N,) anomaly scores in about [0.3, 1]; higher = less like the training features."""
        self._check_fitted()
        x = self._check_features(features)
        if len(x) == 0:
            return np.zeros(0)
        return -self._forest.score_samples(self._impute(x))

    def params(self):
        return {"n_estimators": self.n_estimators, "max_samples": self.max_samples, "max_train": self.max_train,
                "seed": self.seed}

    def state_dict(self):
        self._check_fitted()
        return {"bank": self.bank_}

    def _load_state(self, arrays):
        super()._load_state(arrays)
        self._refit()
