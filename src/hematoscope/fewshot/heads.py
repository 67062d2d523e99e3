"""Classifier heads on frozen features: small scikit-learn pipelines built from a name.

``make_head("lr")`` → StandardScaler → LogisticRegression; ``"svm"`` linear SVM, ``"svm-rbf"``
RBF SVM, ``"knn"`` cosine k-nearest neighbours, ``"proto"`` cosine nearest class mean. Each can be
preceded by a StandardScaler or a PowerTransformer, then an optional PCA, as in Wenderoth et
al. 2025. All heads give ``predict_proba`` whose columns follow ``classes_``.

Persistence (no pickle): a head is stored as its :class:`HeadSpec` (JSON) plus the training
features and labels (safetensors), and refitted at load. Every step is deterministic (fixed
``random_state``, exact solvers), so the refit reproduces the saved head; the bundle also stores
probe probabilities and checks them on load. This is simpler and more robust across library
versions than serialising each estimator's private arrays, and a kNN head needs the training
features anyway. Cost: loading refits the head (well under a second at few-shot sizes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from hematoscope.trust.calibration import softmax
from hematoscope.bundle.ood import l2_normalize

HEAD_NAMES = ("lr", "svm", "svm-rbf", "knn", "proto")
TRANSFORMS = ("standard", "power", "none")


class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class mean under cosine similarity, with softmax probabilities.

    Each class is represented by the mean of its L2-normalised training vectors; the score of
    a class is the cosine similarity to that prototype divided by ``temperature``.

    Parameters:
        temperature: softmax temperature on cosine similarities (smaller = sharper).

    Attributes:
        classes_: class labels in column order of ``predict_proba``.
        prototypes_: (n_classes, n_features) unit-norm class means.
    """

    def __init__(self, temperature: float = 0.1):
        self.temperature = temperature

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        self.classes_, idx = np.unique(y, return_inverse=True)
        Xn = l2_normalize(X)
        self.prototypes_ = l2_normalize(np.stack([Xn[idx == k].mean(0) for k in range(len(self.classes_))]))
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        scores = l2_normalize(X) @ self.prototypes_.T / self.temperature
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return softmax(l2_normalize(X) @ self.prototypes_.T / self.temperature)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]


class CosineKNNClassifier(ClassifierMixin, BaseEstimator):
    """k nearest neighbours under cosine similarity, with smoothed vote probabilities.

    ``k`` is capped at the training set size, so the same head works from 1 label per class up.
    Votes are weighted by similarity; ``smoothing`` adds a small uniform mass so that log
    probabilities stay finite (needed for temperature calibration).

    Parameters:
        n_neighbors: neighbours consulted (capped at the number of training samples).
        smoothing: pseudo-count added to every class's vote before normalising.

    Attributes:
        classes_: class labels in column order of ``predict_proba``.
        n_neighbors_: the k actually used.
    """

    def __init__(self, n_neighbors: int = 10, smoothing: float = 0.01):
        self.n_neighbors = n_neighbors
        self.smoothing = smoothing

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1; got {self.n_neighbors}")
        self.classes_, self.train_index_ = np.unique(y, return_inverse=True)
        self.train_features_ = l2_normalize(X)
        self.n_neighbors_ = min(self.n_neighbors, len(X))
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        sims = l2_normalize(X) @ self.train_features_.T
        k = self.n_neighbors_
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.clip(np.take_along_axis(sims, nn, 1), 0, None) + 1e-6
        votes = np.full((len(X), len(self.classes_)), self.smoothing)
        np.add.at(votes, (np.repeat(np.arange(len(X)), k), self.train_index_[nn].ravel()), weights.ravel())
        return votes / votes.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]


class SoftmaxSVC(ClassifierMixin, BaseEstimator):
    """A support vector classifier whose probabilities are a softmax of one-vs-rest margins.

    Platt scaling (``SVC(probability=True)``) needs an internal 5-fold split, which fails or is
    noisy with a few labels per class; a softmax of the margins is defined from one label per
    class, and the bundle's temperature calibration rescales it afterwards.

    Parameters:
        kernel: ``"linear"`` (``LinearSVC``, one-vs-rest) or ``"rbf"`` (``SVC``).
        C: regularisation strength (inverse).
        gamma: RBF kernel width (``"scale"`` or a float).
        scale: multiplier on margins before the softmax.
        random_state: seed for the solver.

    Attributes:
        classes_: class labels in column order of ``predict_proba``.
        svm_: the fitted scikit-learn SVM.
    """

    def __init__(self, kernel: str = "linear", C: float = 1.0, gamma: str | float = "scale",
                 scale: float = 5.0, random_state: int = 0):
        self.kernel = kernel
        self.C = C
        self.gamma = gamma
        self.scale = scale
        self.random_state = random_state

    def fit(self, X, y):
        from sklearn.svm import SVC, LinearSVC

        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least 2 classes; got {len(self.classes_)} class")
        if self.kernel == "linear":
            self.svm_ = LinearSVC(C=self.C, max_iter=20000, random_state=self.random_state)
        elif self.kernel == "rbf":
            self.svm_ = SVC(kernel="rbf", C=self.C, gamma=self.gamma, decision_function_shape="ovr",
                            random_state=self.random_state)
        else:
            raise ValueError(f"kernel must be 'linear' or 'rbf'; got {self.kernel!r}")
        self.svm_.fit(X, y)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.svm_.decision_function(X)

    def predict_proba(self, X) -> np.ndarray:
        d = self.decision_function(X)
        if d.ndim == 1:  # binary: one margin, positive = classes_[1]
            d = np.stack([-d, d], 1) / 2
        return softmax(self.scale * d)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]


@dataclass(frozen=True)
class HeadSpec:
    """A head by name, with its preprocessing and classifier parameters (all JSON-able).

    Attributes:
        name: one of :data:`HEAD_NAMES`.
        transform: ``"standard"`` (StandardScaler), ``"power"`` (Yeo-Johnson PowerTransformer)
            or ``"none"``.
        pca: PCA components after the transform (int, or a float in (0, 1) for explained
            variance); None = no PCA.
        params: keyword arguments for the classifier (e.g. ``{"C": 0.5}``).
        self_training: confidence threshold for scikit-learn's ``SelfTrainingClassifier``:
            unlabelled images (target -1) predicted above it are added as pseudo-labels and the
            head refitted; None = labelled images only.
    """

    name: str = "lr"
    transform: str = "standard"
    pca: int | float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    self_training: float | None = None

    def __post_init__(self) -> None:
        if self.name not in HEAD_NAMES:
            raise ValueError(f"unknown head {self.name!r}; choose from {', '.join(HEAD_NAMES)}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}; got {self.transform!r}")
        if self.self_training is not None and not 0 < self.self_training < 1:
            raise ValueError(f"self_training threshold must be in (0, 1); got {self.self_training}")

    @property
    def label(self) -> str:
        """Short display name, e.g. ``lr`` or ``lr+self``."""
        return self.name + ("+self" if self.self_training is not None else "")

    @classmethod
    def parse(cls, text: str) -> "HeadSpec":
        """``"lr"`` or ``"lr+self"`` (self-training at threshold 0.9) → HeadSpec."""
        name, _, extra = text.strip().partition("+")
        if extra not in ("", "self"):
            raise ValueError(f"unknown head modifier {extra!r} in {text!r}; only '+self' exists")
        return cls(name, self_training=0.9 if extra else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadSpec":
        return cls(**d)

    def build(self):
        """An unfitted scikit-learn Pipeline for this spec."""
        return make_head(self.name, transform=self.transform, pca=self.pca, self_training=self.self_training,
                         **self.params)


def make_head(name: str = "lr", *, transform: str = "standard", pca: int | float | None = None,
              random_state: int = 0, self_training: float | None = None, **params):
    """A scikit-learn Pipeline ``[transform] → [PCA] → classifier`` from a head name.

    Args:
        name: ``"lr"``, ``"svm"``, ``"svm-rbf"``, ``"knn"`` or ``"proto"``.
        transform: ``"standard"``, ``"power"`` or ``"none"``.
        pca: PCA components (int or variance fraction), or None.
        random_state: seed of every randomised step.
        self_training: wrap the classifier in ``SelfTrainingClassifier`` with this threshold;
            fit then accepts unlabelled rows with target -1 (integer targets only).
        **params: classifier parameters (e.g. ``C=0.5``, ``n_neighbors=5``).

    Raises:
        ValueError: unknown head or transform name.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import PowerTransformer, StandardScaler

    HeadSpec(name, transform, pca)  # validates names
    steps = []
    if transform == "standard":
        steps.append(("scale", StandardScaler()))
    elif transform == "power":
        steps.append(("scale", PowerTransformer(method="yeo-johnson", standardize=True)))
    if pca is not None:
        steps.append(("pca", PCA(n_components=pca, svd_solver="full", random_state=random_state)))
    if name == "lr":
        clf = LogisticRegression(**{"C": 0.5, "max_iter": 3000, **params})
    elif name == "svm":
        clf = SoftmaxSVC(kernel="linear", random_state=random_state, **{"C": 0.01, **params})
    elif name == "svm-rbf":
        clf = SoftmaxSVC(kernel="rbf", random_state=random_state, **{"C": 10.0, **params})
    elif name == "knn":
        clf = CosineKNNClassifier(**params)
    else:
        clf = PrototypeClassifier(**params)
    if self_training is not None:
        from sklearn.semi_supervised import SelfTrainingClassifier

        clf = SelfTrainingClassifier(clf, threshold=self_training, max_iter=5)
    steps.append(("clf", clf))
    return Pipeline(steps)
