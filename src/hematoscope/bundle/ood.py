"""Out-of-distribution scorers: higher score = less like the training data.

Each scorer is registered by name (``@register_scorer``), fitted on in-distribution training
outputs, and persisted as plain arrays in ``ood.safetensors`` plus the JSON-able
:meth:`OODScorer.config` that a bundle stores in ``BundleConfig.ood``. The decision threshold is
chosen later on validation data (:func:`hematoscope.trust.fit_trust`). The scorers live with the
bundle, which loads and runs them at prediction time; :mod:`hematoscope.trust` fits them.

Feature scorers (``mahalanobis``, ``knn``) use penultimate-layer features, L2-normalised first
so that the image's overall feature magnitude does not dominate; logit scorers (``energy``,
``max_softmax``) are cheap fallbacks for bundles that expose no features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from hematoscope._registry import Registry

#: File inside a bundle that holds a scorer's arrays.
OOD_FILE = "ood.safetensors"

#: Shares of the validation cells a flag may be set to accept after fitting (``--ood-accept``):
#: each fit stores the threshold for every one, so a lab can move the operating point without
#: the training data.
OOD_ACCEPT_LEVELS = (0.8, 0.9, 0.95, 0.975, 0.99)


def accept_levels(scores: np.ndarray, *, min_rejected: float = 0.0) -> dict[str, float]:
    """{share: threshold accepting that share of ``scores``} for :data:`OOD_ACCEPT_LEVELS`, the
    form ``BundleConfig.ood`` and ``ViewTrust`` store (keys as JSON-stable text).

    ``min_rejected``: leave out the shares that would reject fewer than this many of ``scores``
    (with 12 scores, "99 % pass" is the largest score, not an estimate of a 99th percentile)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        return {}
    return {str(q): float(np.quantile(scores, q)) for q in OOD_ACCEPT_LEVELS
            if len(scores) * (1 - q) >= min_rejected - 1e-9}


class ScorerError(ValueError):
    """A scorer is unknown, unfitted, or was given the wrong inputs."""


#: Scorers by name; those of other packages are imported on first use (so a bundle config naming
#: them loads).
SCORERS: Registry[type["OODScorer"]] = Registry("OOD method", error=ScorerError,
                                                lazy={"isolation_forest": "hematoscope.classical.anomaly"})


def register_scorer(name: str) -> Callable[[type["OODScorer"]], type["OODScorer"]]:
    """Class decorator: make a scorer available under ``name`` (duplicates are an error)."""
    return SCORERS.register(name, name=name)


def list_scorers() -> list[str]:
    """Names of the registered scorers (including those of other packages, imported on use)."""
    return SCORERS.names()


def get_scorer(name: str) -> type["OODScorer"]:
    """The scorer class registered under ``name``.

    Raises:
        ScorerError: no scorer has that name.
    """
    return SCORERS.get(name)


def load_scorer(config_ood: dict[str, Any], directory: Path | str) -> "OODScorer":
    """Rebuild a fitted scorer from a bundle's ``config.ood`` and its ``ood.safetensors``.

    Raises:
        ScorerError: unknown method, or the arrays file is missing/incomplete.
    """
    cls = get_scorer(str(config_ood.get("method")))
    arrays: dict[str, np.ndarray] = {}
    if cls.array_names:
        path = Path(directory) / OOD_FILE
        if not path.exists():
            raise ScorerError(f"{path} is missing: the bundle's {cls.name} OOD scorer cannot be loaded")
        from hematoscope._io import read_safetensors

        arrays = read_safetensors(path)
        missing = set(cls.array_names) - set(arrays)
        if missing:
            raise ScorerError(f"{path} lacks arrays {sorted(missing)} needed by the {cls.name} scorer")
    return cls.from_state(config_ood, arrays)


def l2_normalize(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class OODScorer:
    """Base class. Subclasses set ``needs_features``/``array_names`` and implement
    ``fit``, ``score``, ``params`` (JSON) and ``state_dict`` (arrays)."""

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    array_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.target_tpr: float | None = None
        #: :func:`accept_levels` of the scores the threshold was chosen on (None: not stored).
        self.accept_levels: dict[str, float] | None = None

    # --- per-scorer -------------------------------------------------------------------
    def fit(self, features: np.ndarray | None, labels: np.ndarray, logits: np.ndarray) -> "OODScorer":
        """Learn from in-distribution training outputs; returns ``self``."""
        return self

    def score(self, *, features: np.ndarray | None, logits: np.ndarray) -> np.ndarray:
        """(N,) OOD scores, higher = more out-of-distribution."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """JSON-able hyper-parameters needed to rebuild the scorer."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Fitted arrays, saved in ``ood.safetensors``."""
        return {}

    def view_params(self, features: np.ndarray | None, labels: np.ndarray, logits: np.ndarray, *,
                    temperature: float = 1.0) -> dict[str, float]:
        """Parameters to refit for outputs of another view count (the same training images as
        :meth:`fit` saw, averaged over a different number of test-time views), keeping the fitted
        arrays; {} when nothing depends on the view count. See :meth:`set_params`."""
        return {}

    def set_params(self, params: dict[str, Any]) -> None:
        """Set parameters from :meth:`view_params` (on a copy that shares the fitted arrays).

        Raises:
            ScorerError: a parameter this scorer does not have.
        """
        unknown = set(params) - set(self.params())
        if unknown:
            raise ScorerError(f"the {self.name} scorer has no parameters {sorted(unknown)}")
        for key, value in params.items():
            setattr(self, key, value)

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for key in self.array_names:
            setattr(self, key + "_", arrays[key])

    # --- common -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The dict stored in ``BundleConfig.ood``: method, threshold, target_tpr, params and the
        acceptance levels when stored (absent otherwise, so older bundles' fingerprints hold)."""
        levels = {} if self.accept_levels is None else {"accept_levels": dict(self.accept_levels)}
        return {"method": self.name, "threshold": self.threshold, "target_tpr": self.target_tpr, **self.params(),
                **levels}

    @classmethod
    def from_state(cls, config_ood: dict[str, Any], arrays: dict[str, np.ndarray]) -> "OODScorer":
        import inspect

        names = list(inspect.signature(cls.__init__).parameters)[1:]
        scorer = cls(**{k: config_ood[k] for k in names if k in config_ood})
        scorer.threshold = config_ood.get("threshold")
        scorer.target_tpr = config_ood.get("target_tpr")
        levels = config_ood.get("accept_levels")
        scorer.accept_levels = None if levels is None else {str(k): float(v) for k, v in levels.items()}
        scorer._load_state(arrays)
        return scorer

    def save(self, directory: Path | str) -> None:
        """Write the fitted arrays to ``directory/ood.safetensors`` (nothing for stateless scorers)."""
        state = self.state_dict()
        if not state:
            return
        from safetensors.numpy import save_file

        from hematoscope._io import atomic_path

        with atomic_path(Path(directory) / OOD_FILE, ".safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))

    def _features(self, features: np.ndarray | None) -> np.ndarray:
        if features is None:
            raise ScorerError(f"the {self.name} OOD scorer needs penultimate features, but the model "
                              "gave none; refit trust with method 'energy' or 'max_softmax'")
        return l2_normalize(features)

    def _check_fitted(self) -> None:
        if any(getattr(self, k + "_", None) is None for k in self.array_names):
            raise ScorerError(f"the {self.name} scorer is not fitted")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


@register_scorer("mahalanobis")
class MahalanobisScorer(OODScorer):
    """Minimum Mahalanobis distance to the class means with one shared covariance [0].

    The covariance of the class-centred, L2-normalised features is estimated with Ledoit-Wolf
    shrinkage (scikit-learn), which keeps the 1,280-d precision matrix well conditioned with a
    few thousand training images.

    [0] Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
        Adversarial Attacks", NeurIPS 2018.
    """

    needs_features = True
    #: The precision matrix is symmetric: only its upper triangle is stored (half the bytes;
    #: this keeps the shipped default bundle under its size limit).
    array_names = ("means", "precision_upper")

    def __init__(self) -> None:
        super().__init__()
        self.means_: np.ndarray | None = None
        self.precision_: np.ndarray | None = None

    def fit(self, features, labels, logits=None):
        from sklearn.covariance import LedoitWolf

        x = self._features(features)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([x[labels == c].mean(0) for c in classes])
        centred = x - means[np.searchsorted(classes, labels)]
        lw = LedoitWolf(assume_centered=True).fit(centred)
        self.means_ = means.astype(np.float32)
        self.precision_ = lw.precision_.astype(np.float32)
        return self

    def score(self, *, features, logits=None):
        self._check_fitted()
        x = self._features(features).astype(np.float64)
        p, pm, mpm = self._expanded()
        # (x-m)ᵀP(x-m) = xᵀPx - 2xᵀ(Pm) + mᵀPm: one N×D×D product for all classes, not one per class
        d = np.einsum("nd,nd->n", x @ p, x)[:, None] - 2.0 * (x @ pm) + mpm[None, :]
        return d.min(1)

    def _expanded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 precision P, P·means (D, C) and meansᵀ·P·means (C,), cached per fitted state."""
        if getattr(self, "_expanded_of", None) is not self.precision_:
            p = self.precision_.astype(np.float64)
            mu = self.means_.astype(np.float64)
            pm = p @ mu.T
            self._expanded_cache = (p, pm, np.einsum("cd,dc->c", mu, pm))
            self._expanded_of = self.precision_
        return self._expanded_cache

    def state_dict(self):
        self._check_fitted()
        return {"means": self.means_, "precision_upper": self.precision_[np.triu_indices(len(self.precision_))]}

    def _load_state(self, arrays):
        self.means_ = arrays["means"]
        upper = arrays["precision_upper"]
        d = self.means_.shape[1]
        if upper.shape != (d * (d + 1) // 2,):
            raise ScorerError(f"mahalanobis precision has {upper.size} values; expected {d * (d + 1) // 2}")
        p = np.zeros((d, d), dtype=upper.dtype)
        p[np.triu_indices(d)] = upper
        self.precision_ = p + np.triu(p, 1).T

    def _check_fitted(self) -> None:
        if self.means_ is None or self.precision_ is None:
            raise ScorerError("the mahalanobis scorer is not fitted")


@register_scorer("knn")
class KNNScorer(OODScorer):
    """Cosine distance to the k-th nearest of a stored random subset of training features [0].

    Args:
        k: which neighbour's distance is the score.
        max_train: at most this many training features are stored (random, seeded).
        seed: seed of the subset draw.

    [0] Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
    """

    needs_features = True
    array_names = ("bank",)

    def __init__(self, k: int = 10, max_train: int = 5000, seed: int = 0) -> None:
        super().__init__()
        self.k, self.max_train, self.seed = int(k), int(max_train), int(seed)
        self.bank_: np.ndarray | None = None
        self._bank32_box: dict = {}  # {"of": bank_, "bank": its float32 copy}, shared by shallow copies

    def fit(self, features, labels=None, logits=None):
        x = self._features(features)
        if len(x) > self.max_train:
            x = x[np.random.default_rng(self.seed).choice(len(x), self.max_train, replace=False)]
        if len(x) < self.k:
            raise ScorerError(f"knn scorer needs at least k={self.k} training features, got {len(x)}")
        self.bank_ = x.astype(np.float16)  # unit vectors: half precision halves the bundle's size
        return self

    def score(self, *, features, logits=None):
        self._check_fitted()
        x = self._features(features).astype(np.float32)
        sims = x @ self.bank32().T
        kth = -np.partition(-sims, self.k - 1, axis=1)[:, self.k - 1]
        return (1.0 - kth).astype(np.float64)

    def bank32(self) -> np.ndarray:
        """The bank as float32, converted once per fitted bank and shared by shallow copies
        (the per-view-count variants of a bundle's scorer)."""
        cache = self.__dict__.setdefault("_bank32_box", {})  # the same dict in every copy.copy
        if cache.get("of") is not self.bank_:
            cache["of"], cache["bank"] = self.bank_, self.bank_.astype(np.float32)
        return cache["bank"]

    def params(self):
        return {"k": self.k, "max_train": self.max_train, "seed": self.seed}

    def state_dict(self):
        self._check_fitted()
        return {"bank": self.bank_}


@register_scorer("knn_energy")
class KNNEnergyScorer(KNNScorer):
    """Sum of the standardised :class:`KNNScorer` distance and the free energy of the logits.

    The two see different failures: feature distance flags images unlike any training cell
    (non-cells, blur, stain shifts) and energy flags cells the classifier cannot place, such as
    a cell type it never saw (measured on PBC: docs/trust.md). Each part is centred on its median
    and scaled by its 50-90 % quantile spread over a held-out fifth of the training outputs
    (distances to the bank itself would be too small), so neither dominates by its units.

    Args:
        k, max_train, seed: as for :class:`KNNScorer` (``seed`` also draws the held-out fifth).
        knn_center, knn_scale, energy_center, energy_scale: fitted standardisation (from fit).
    """

    def __init__(self, k: int = 10, max_train: int = 5000, seed: int = 0, knn_center: float | None = None,
                 knn_scale: float | None = None, energy_center: float | None = None,
                 energy_scale: float | None = None) -> None:
        super().__init__(k=k, max_train=max_train, seed=seed)
        self.norm = (knn_center, knn_scale, energy_center, energy_scale)

    def fit(self, features, labels=None, logits=None):
        if logits is None:
            raise ScorerError("the knn_energy scorer needs the training logits")
        n = len(self._features(features))
        held = self._held_out(n)
        if n - held.sum() < self.k:
            raise ScorerError(f"knn_energy scorer needs more than {self.k} training features, got {n}")
        super().fit(np.asarray(features)[~held])
        knn = super().score(features=np.asarray(features)[held])
        energy = EnergyScorer().score(logits=np.asarray(logits)[held])
        self.norm = (*_center_scale(knn), *_center_scale(energy))
        return self

    def _held_out(self, n: int) -> np.ndarray:
        held = np.zeros(n, bool)
        held[np.random.default_rng(self.seed).choice(n, max(1, n // 5), replace=False)] = True
        return held

    def view_params(self, features, labels, logits, *, temperature: float = 1.0):
        """The standardisation refitted on the same held-out fifth of the training images (the
        same rows :meth:`fit` drew), with their outputs for another view count."""
        held = self._held_out(len(features))
        knn = KNNScorer.score(self, features=np.asarray(features)[held])
        energy = EnergyScorer().score(logits=np.asarray(logits)[held])
        kc, ks, ec, es = (*_center_scale(knn), *_center_scale(energy))
        return {"knn_center": kc, "knn_scale": ks, "energy_center": ec, "energy_scale": es}

    def set_params(self, params):
        names = ("knn_center", "knn_scale", "energy_center", "energy_scale")
        unknown = set(params) - set(names)
        if unknown:
            raise ScorerError(f"the knn_energy scorer has no parameters {sorted(unknown)}")
        self.norm = tuple(params.get(k, v) for k, v in zip(names, self.norm))

    def score(self, *, features, logits):
        if None in self.norm:
            raise ScorerError("the knn_energy scorer is not fitted")
        kc, ks, ec, es = self.norm
        return (super().score(features=features) - kc) / ks + (EnergyScorer().score(logits=logits) - ec) / es

    def params(self):
        kc, ks, ec, es = self.norm
        return {**super().params(), "knn_center": kc, "knn_scale": ks, "energy_center": ec, "energy_scale": es}


def _center_scale(scores: np.ndarray) -> tuple[float, float]:
    p50, p90 = np.percentile(scores, [50, 90])
    return float(p50), float(max(p90 - p50, 1e-12))


@register_scorer("energy")
class EnergyScorer(OODScorer):
    """Free energy ``-T * logsumexp(logits / T)`` [0]; needs logits only.

    [0] Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def score(self, *, features=None, logits):
        from scipy.special import logsumexp

        return -self.temperature * logsumexp(np.asarray(logits, dtype=np.float64) / self.temperature, axis=1)

    def params(self):
        return {"temperature": self.temperature}


@register_scorer("max_softmax")
class MaxSoftmaxScorer(OODScorer):
    """``1 - max softmax(logits / T)`` [0], the simplest baseline; needs logits only.

    [0] Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
        Examples in Neural Networks", ICLR 2017.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def score(self, *, features=None, logits):
        from scipy.special import softmax

        return 1.0 - softmax(np.asarray(logits, dtype=np.float64) / self.temperature, axis=1).max(1)

    def view_params(self, features, labels, logits, *, temperature: float = 1.0):
        return {"temperature": float(temperature)}

    def params(self):
        return {"temperature": self.temperature}
