"""The model bundle: a directory that carries a model, its preprocessing, labels and metrics.

Layout (every kind)::

    config.json        BundleConfig (validated by pydantic on load; no executable strings)
    metrics.json       metrics with the split they were measured on
    README.md          model card generated from config + metrics
    <weights>          kind-specific: model.safetensors, head.safetensors, xgboost.json ...
    ood.safetensors    optional out-of-distribution scorer state (see hematoscope.trust)

``load_bundle`` reads ``config.json``, checks ``format_version`` and dispatches on ``kind`` to
the class registered with :func:`register_bundle_kind`. Downstream code (predict, evaluate,
serve, export) only ever talks to :class:`Bundle`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hematoscope import _io
from hematoscope._registry import Registry
from hematoscope.bundle.prediction import LOW_CONFIDENCE, UNLIKE_TRAINING, Prediction, SkippedFile
from hematoscope.models.preprocess import TTA_VIEWS, Preprocess

log = logging.getLogger("hematoscope")

FORMAT_VERSION = 1
#: The name that stands for the package's shipped model wherever a bundle path is asked for.
DEFAULT_NAME = "default"
#: Older format versions this code can still read (upgraded in memory on load).
READABLE_FORMAT_VERSIONS = (1,)
INTENDED_USE = (
    "Research and decision support for classifying single peripheral-blood cell crops. "
    "Not a medical device: every result must be reviewed by a qualified person."
)


class BundleError(ValueError):
    """A bundle directory is missing, malformed or from an incompatible version."""


class ViewTrust(BaseModel):
    """Trust settings fitted for one number of test-time views (``BundleConfig.view_trust``).

    Averaging more views changes the logits and features, so a temperature or threshold fitted
    for 8 views is wrong for 1: each view count has its own, fitted on the same validation images.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(gt=0)
    abstain_threshold: float = Field(ge=0, le=1)
    #: OOD flag threshold for this many views (None: the bundle has no OOD scorer).
    ood_threshold: float | None = None
    #: Scorer parameters refitted for this many views (e.g. knn_energy's standardisation),
    #: merged over ``BundleConfig.ood``; the scorer's arrays are shared by every view count.
    ood_params: dict[str, float] = Field(default_factory=dict)
    #: What the fit measured on validation data (n, accepted share, accuracy ...).
    val: dict[str, Any] = Field(default_factory=dict)


class CascadeRule(BaseModel):
    """Adaptive views: every cell gets ``fast_views``; a cell whose fast answer is uncertain
    (calibrated confidence below ``min_confidence`` or OOD score above ``max_ood``) is run again
    with ``slow_views`` and answered from those. A fast OOD score above ``reject_ood`` is flagged
    at once (no validation cell that high was accepted by the slow path). Fitted on validation
    data by :func:`hematoscope.trust.views.fit_cascade`."""

    model_config = ConfigDict(extra="forbid")

    fast_views: int = 1
    slow_views: int = 8
    #: Above 1 (e.g. 1.01): every cell takes the slow path.
    min_confidence: float = Field(ge=0)
    max_ood: float | None = None
    reject_ood: float | None = None
    #: What the fit measured on validation data (slow share, agreement with slow_views ...).
    val: dict[str, Any] = Field(default_factory=dict)

    @field_validator("fast_views", "slow_views")
    @classmethod
    def _known_view_count(cls, value: int) -> int:
        if value not in TTA_VIEWS:
            raise ValueError(f"view counts must be one of {TTA_VIEWS}; got {value}")
        return value


@dataclass(frozen=True)
class TrustSettings:
    """The trust settings in force for one view count (see :meth:`Bundle.trust_for`)."""

    views: int
    temperature: float
    abstain_threshold: float
    ood_threshold: float | None
    ood_params: dict
    #: None when fitted for this view count; otherwise why the bundle-wide settings are used.
    fallback: str | None = None


class BundleConfig(BaseModel):
    """Everything needed to rebuild a model and use it, written by the code that trained it."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    kind: str
    name: str = "unnamed"
    hematoscope_version: str = ""
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    labels: list[str] = Field(min_length=2, description="canonical class names in output index order")
    taxonomy_version: str = ""
    preprocess: dict[str, Any]
    #: Kind-specific model description (architecture, backbone reference, head type ...).
    model: dict[str, Any] = Field(default_factory=dict)
    #: Softmax temperature fitted on validation data (1.0 = uncalibrated).
    temperature: float = Field(default=1.0, gt=0)
    #: Abstain when the calibrated top-1 probability is below this value.
    abstain_threshold: float = Field(default=0.0, ge=0, le=1)
    #: Flip/rot90 views averaged per image (1, 2, 4 or 8): more views cost proportionally more
    #: time and give fewer confident mistakes and better unknown-cell flags. Temperature, OOD
    #: and abstain thresholds are fitted with the value set here.
    tta: int = 1
    #: Out-of-distribution scorer: {"method": ..., "threshold": ..., ...}; None = not fitted.
    ood: dict[str, Any] | None = None
    #: Trust fitted per view count ({"1": ViewTrust, "8": ...}, by `hematoscope trust fit`); the
    #: top-level temperature / abstain_threshold / ood threshold equal the entry for ``tta``.
    #: Empty (bundles fitted before per-view trust): the top-level settings serve every view count.
    view_trust: dict[str, ViewTrust] = Field(default_factory=dict)
    #: Fingerprint of the top-level trust settings ``view_trust`` was fitted with: when something
    #: refits them alone (e.g. ``adapt``), the per-view entries are stale and not used.
    view_trust_of: str | None = None
    #: Adaptive views, the default way to predict when set (``--tta N`` forces N fixed views).
    cascade: CascadeRule | None = None
    #: Set by :func:`hematoscope.bundle.adapt.adapt_bundle`: the lab's images it was adapted on
    #: (name, count, content hash) and what changed; None = as trained.
    adaptation: dict[str, Any] | None = None
    #: How it was trained: recipe, data sources and fingerprint, split, seed, time.
    training: dict[str, Any] = Field(default_factory=dict)
    intended_use: str = INTENDED_USE
    data_sources: list[str] = Field(default_factory=list)
    changelog: dict[str, str] = Field(default_factory=dict)

    @field_validator("tta")
    @classmethod
    def _known_view_count(cls, value: int) -> int:
        if value not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {TTA_VIEWS}; got {value}")
        return value

    @field_validator("view_trust")
    @classmethod
    def _known_view_keys(cls, value: dict) -> dict:
        bad = sorted(k for k in value if k not in {str(v) for v in TTA_VIEWS})
        if bad:
            raise ValueError(f"view_trust keys must be view counts {TTA_VIEWS}; got {bad}")
        return value

    def trust_fingerprint(self) -> str:
        """Hash of the top-level trust settings (temperature, abstain threshold, OOD config)."""
        text = json.dumps([self.temperature, self.abstain_threshold, self.ood], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ModelOutput:
    """Raw model output for a batch: ``logits`` (N, C) and optional ``features`` (N, D)
    (penultimate-layer features, used by out-of-distribution scorers)."""

    logits: np.ndarray
    features: np.ndarray | None = None


#: Bundle classes by kind; the built-in kinds' modules are imported on demand by load_bundle.
_KINDS: Registry[type["Bundle"]] = Registry("bundle kind", error=BundleError, lazy={
    "neural": "hematoscope.bundle.neural",
    "fewshot": "hematoscope.fewshot.bundle",
    "classical": "hematoscope.classical.bundle",
})


def register_bundle_kind(kind: str) -> Callable[[type["Bundle"]], type["Bundle"]]:
    """Class decorator: make ``load_bundle`` build this class for ``config.kind == kind``."""
    return _KINDS.register(kind, kind=kind)


def bundle_class(kind: str) -> type["Bundle"]:
    return _KINDS.get(kind)


class Bundle(ABC):
    """A trained classifier plus everything needed to use it. Subclasses implement
    :meth:`forward`, :meth:`_save_weights` and :meth:`_load_weights`."""

    kind: ClassVar[str] = ""
    #: Whether :meth:`forward` averages ``config.tta`` test-time views.
    supports_tta: ClassVar[bool] = False

    def __init__(self, config: BundleConfig, metrics: dict | None = None, path: Path | None = None):
        self.config = config
        self.metrics = metrics or {}
        self.path = path
        self.preprocess = Preprocess.from_dict(config.preprocess)
        self.ood = None  # an OOD scorer from hematoscope.trust, or None
        #: Fixed view count forced by set_tta (None: the bundle's default, the cascade when fitted).
        self._forced_views: int | None = None
        #: The view count the bundle-wide trust settings were fitted for (set_tta changes
        #: config.tta, not this; fitting trust does).
        self.trust_views: int = config.tta
        self._mode_scorers: dict = {}
        self._warned: set = set()
        #: 1.0 for the classes answers may name, 0.0 for the others (None: every label).
        self._answerable: np.ndarray | None = None

    # --- what a kind provides ----------------------------------------------------------
    @abstractmethod
    def forward(self, images: Sequence[np.ndarray]) -> ModelOutput:
        """RGB uint8 images of any size → logits (and features when the kind has them)."""

    @abstractmethod
    def _save_weights(self, directory: Path) -> None:
        """Write the kind's weight files into ``directory`` (no pickle)."""

    @classmethod
    @abstractmethod
    def _load_weights(cls, config: BundleConfig, directory: Path, metrics: dict) -> "Bundle":
        """Rebuild the bundle from ``config`` and the weight files in ``directory``."""

    def forward_views(self, images: Sequence[np.ndarray], views: int = 8):
        """Raw outputs of each of the first ``views`` test-time views (kinds with views)."""
        raise BundleError(f"{self.kind!r} bundles do not support test-time views")

    def _adapt_statistics(self, images: Sequence[np.ndarray], *, batch_size: int = 64,
                          mix: float | None = None) -> dict:
        """Re-estimate the model's normalisation statistics on a new lab's images, in place, as
        ``mix`` * new + (1 - ``mix``) * trained (None: the kind chooses); returns what changed
        (JSON-able). Kinds without such statistics change nothing."""
        return {}

    def adapt(self, images: Iterable, *, source: str = "unnamed images", name: str | None = None,
              target_tpr: float = 0.95, mix: float | None = None) -> "Bundle":
        """A copy of this bundle adapted to a new lab from its unlabelled cell crops (paths,
        bytes or arrays): normalisation statistics and the OOD reference and threshold are
        refitted, nothing else. See :func:`hematoscope.bundle.adapt.adapt_bundle`.

        Raises:
            BundleError: too few readable images.
        """
        from hematoscope.bundle.adapt import adapt_bundle

        return adapt_bundle(self, images, source=source, name=name, target_tpr=target_tpr, mix=mix)[0]

    # --- common behaviour ----------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    @property
    def name(self) -> str:
        return self.config.name

    def set_tta(self, views: int) -> None:
        """Average ``views`` flip/rot90 views per image from now on (1 = off).

        Raises:
            BundleError: the kind has no test-time views, or ``views`` is not 1, 2, 4 or 8.
        """
        if views != 1 and not self.supports_tta:
            raise BundleError(f"{self.kind!r} bundles do not support test-time views")
        if views not in TTA_VIEWS:
            raise BundleError(f"test-time views must be one of {TTA_VIEWS}; got {views}")
        self.config.tta = views
        self._forced_views = views

    def restrict_classes(self, classes: Sequence[str] | None) -> None:
        """Answer only among ``classes`` from now on (None: all of :attr:`labels` again).

        For a lab whose crops can only hold some of the classes (e.g. white cells for a 5-part
        differential, where an immature granulocyte, erythroblast or platelet answer is
        certainly wrong): the calibrated probabilities are renormalised over ``classes`` before
        the abstain rule, and the other classes get probability 0. The OOD flag is unchanged
        (it asks whether an image is unlike the training data, whatever the answer may be).
        Not saved with the bundle.

        Raises:
            BundleError: a name that is not one of the bundle's labels, or fewer than 2 classes.
        """
        if classes is None:
            self._answerable = None
            return
        wanted = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
        unknown = [c for c in wanted if c not in self.labels]
        if unknown:
            raise BundleError(f"not classes of {self.name!r}: {', '.join(unknown)}; "
                              f"its classes are {', '.join(self.labels)}")
        if len(wanted) < 2:
            raise BundleError(f"restricting answers needs at least 2 classes, got {wanted}")
        self._answerable = np.array([float(c in wanted) for c in self.labels])

    @property
    def answerable_classes(self) -> list[str]:
        """The classes answers may name (:meth:`restrict_classes`)."""
        if self._answerable is None:
            return list(self.labels)
        return [c for c, keep in zip(self.labels, self._answerable) if keep]

    @property
    def uses_cascade(self) -> bool:
        """Whether :meth:`predict_arrays` runs the adaptive-view cascade: the bundle has a fitted
        cascade rule and up-to-date per-view trust, supports views, and no fixed view count was
        forced with :meth:`set_tta`."""
        cfg = self.config
        if not (self.supports_tta and cfg.cascade is not None and self._forced_views is None):
            return False
        if cfg.view_trust_of != cfg.trust_fingerprint() or not {str(cfg.cascade.fast_views),
                                                                 str(cfg.cascade.slow_views)} <= set(cfg.view_trust):
            if "cascade" not in self._warned:
                self._warned.add("cascade")
                log.warning("bundle %r: its cascade was fitted with per-view trust that is no longer current; "
                            "using %d fixed views (refit with `hematoscope trust fit BUNDLE SPLIT`)",
                            self.name, cfg.tta)
            return False
        return True

    @property
    def view_mode(self) -> str:
        """``"cascade"`` or the fixed number of views, as text (for reports)."""
        return "cascade" if self.uses_cascade else str(self.config.tta)

    def trust_for(self, views: int | None = None) -> TrustSettings:
        """Temperature, abstain threshold and OOD threshold for ``views`` test-time views
        (default: ``config.tta``).

        The entry fitted for that view count is used when the bundle has one; otherwise (bundles
        fitted before per-view trust, or a view count that was not fitted, or per-view settings
        made stale by a later refit of the bundle-wide ones) the bundle-wide settings are used and
        ``fallback`` says why; a warning is logged once per view count.
        """
        cfg = self.config
        views = int(cfg.tta if views is None else views)
        fitted_for = self.trust_views
        ood_threshold = None if cfg.ood is None else cfg.ood.get("threshold")
        entry = cfg.view_trust.get(str(views))
        why = None
        if entry is not None and cfg.view_trust_of not in (None, cfg.trust_fingerprint()):
            why = ("its per-view trust was fitted before the bundle-wide trust was refitted (e.g. by adapt); "
                   f"using the bundle-wide settings (fitted for {_views(fitted_for)})")
        elif entry is None and views != fitted_for:
            fitted = sorted(int(k) for k in cfg.view_trust) or [fitted_for]
            why = (f"it has no trust fitted for {_views(views)} (fitted: {', '.join(map(str, fitted))}); using the "
                   f"settings fitted for {_views(fitted_for)}, so more or fewer cells than intended may be set "
                   "aside. Fit them with `hematoscope trust fit BUNDLE SPLIT`")
        if entry is None or why is not None:
            if why is not None and views not in self._warned:
                self._warned.add(views)
                log.warning("bundle %r: %s", self.name, why)
            return TrustSettings(views, cfg.temperature, cfg.abstain_threshold, ood_threshold, {}, why)
        return TrustSettings(views, entry.temperature, entry.abstain_threshold, entry.ood_threshold,
                             dict(entry.ood_params))

    def _scorer_for(self, trust: TrustSettings):
        """The OOD scorer with ``trust``'s per-view parameters (shares the fitted arrays)."""
        if not trust.ood_params or self.ood is None:
            return self.ood
        key = (id(self.ood), trust.views, tuple(sorted(trust.ood_params.items())))
        scorer = self._mode_scorers.get(key)
        if scorer is None:
            import copy

            scorer = copy.copy(self.ood)  # shares the fitted arrays (and their float32 copy, once made)
            scorer.set_params(trust.ood_params)
            if len(self._mode_scorers) >= 8:  # a few view counts in use; never grows without bound
                self._mode_scorers.clear()
            self._mode_scorers[key] = scorer
        return scorer

    def predict(
        self,
        images: Iterable[np.ndarray | str | Path | bytes],
        *,
        sources: Sequence[str] | None = None,
        batch_size: int = 64,
    ) -> Prediction:
        """Classify images given as arrays, paths or encoded bytes.

        Files and bytes are decoded with :func:`~hematoscope.data.images.load_model_image`, as on
        every other path (CLI, server, evaluate, trust fit). Unreadable inputs are listed in
        ``Prediction.skipped`` with their reason; the others are answered. Probabilities are
        temperature-calibrated; abstention combines the confidence threshold and the OOD flag.
        """
        from hematoscope.data.images import ImageError, load_model_image

        items = list(images)
        names = list(sources) if sources is not None else [
            str(x) if isinstance(x, (str, Path)) else f"image_{i}" for i, x in enumerate(items)
        ]
        if len(names) != len(items):
            raise ValueError(f"{len(items)} images but {len(names)} source names")
        arrays, kept, skipped = [], [], []
        for item, name in zip(items, names):
            if isinstance(item, np.ndarray):
                arrays.append(item)
                kept.append(name)
                continue
            try:
                arrays.append(load_model_image(item, self.preprocess))
                kept.append(name)
            except ImageError as exc:
                skipped.append(SkippedFile(name, exc.reason))
        parts = [self.predict_arrays(arrays[i:i + batch_size], kept[i:i + batch_size])
                 for i in range(0, len(arrays), batch_size)]
        pred = Prediction.concat(parts, self.labels)
        pred.skipped = skipped
        return pred

    def predict_arrays(self, images: Sequence[np.ndarray], sources: Sequence[str]) -> Prediction:
        """Classify one batch of decoded RGB uint8 arrays."""
        if len(images) == 0:
            return Prediction.empty(self.labels)
        out = self.forward(images)
        return self.decide(out, sources)

    def calibrated_probs(self, logits: np.ndarray, views: int | None = None) -> np.ndarray:
        """Temperature-scaled probabilities, with the temperature fitted for ``views`` views."""
        from hematoscope.trust.calibration import softmax

        return softmax(logits, self.trust_for(views).temperature)

    def decide(self, out: ModelOutput, sources: Sequence[str], views: int | None = None) -> Prediction:
        """Turn raw outputs of ``views`` averaged views (default ``config.tta``) into calibrated
        probabilities, OOD flags and abstain decisions, with the trust fitted for that view count."""
        from hematoscope.trust.calibration import softmax

        trust = self.trust_for(views)
        probs = softmax(out.logits, trust.temperature)
        if self._answerable is not None:
            probs = probs * self._answerable
            probs /= np.maximum(probs.sum(1, keepdims=True), np.finfo(np.float64).tiny)
        n = len(probs)
        if self.ood is not None and trust.ood_threshold is not None:
            scorer = self._scorer_for(trust)
            with single_blas_thread():
                score = np.asarray(scorer.score(features=out.features, logits=out.logits), dtype=np.float64)
            flag = score > float(trust.ood_threshold)
        else:
            score, flag = np.full(n, np.nan), np.zeros(n, bool)
        low = probs.max(1) < trust.abstain_threshold
        reasons = [UNLIKE_TRAINING if f else LOW_CONFIDENCE if lo else None for f, lo in zip(flag, low)]
        return Prediction(self.labels, probs, list(sources), score, flag, flag | low, reasons,
                          views=np.full(n, trust.views, dtype=np.int8))

    # --- persistence -------------------------------------------------------------------
    def save(self, path: Path | str) -> Path:
        """Write the bundle atomically to a directory, or to a ``.zip`` when ``path`` ends so."""
        from hematoscope import __version__

        path = Path(path)
        self.config.hematoscope_version = __version__
        if path.suffix.lower() == ".zip":
            with _io.atomic_path(path, ".zip") as tmp_zip, _tmp_dir() as d:
                self._write_files(d)
                with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                    for f in sorted(d.rglob("*")):
                        if f.is_file():
                            zf.write(f, f.relative_to(d).as_posix())
            return path
        with _io.atomic_dir(path) as d:
            self._write_files(d)
        self.path = path
        return path

    def _write_files(self, d: Path) -> None:
        self._save_weights(d)
        if self.ood is not None:
            self.ood.save(d)
        _io.write_json(d / "config.json", self.config.model_dump(mode="json"))
        _io.write_json(d / "metrics.json", self.metrics)
        from hematoscope.bundle.card import model_card

        _io.write_text(d / "README.md", model_card(self))

    def describe(self) -> dict:
        """A short JSON-able summary (for ``GET /api/models`` and ``hematoscope info``)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": self.labels,
            "input_size": self.preprocess.size,
            "temperature": self.config.temperature,
            "abstain_threshold": self.config.abstain_threshold,
            "ood": self.config.ood,
            "views": self.view_mode,
            "answerable_classes": self.answerable_classes if self._answerable is not None else None,
            "view_trust_fitted": sorted(int(k) for k in self.config.view_trust),
            "metrics": {k: v for k, v in self.metrics.items() if not isinstance(v, (dict, list))},
            "hematoscope_version": self.config.hematoscope_version,
            "adapted_to": (f"{a['source']} ({a['images']} images)" if (a := self.config.adaptation) else None),
            "path": str(self.path) if self.path else None,
        }


_BLAS = None


def _views(n: int) -> str:
    return f"{n} view" + ("s" if n != 1 else "")


def single_blas_thread():
    """Context manager: BLAS (OpenBLAS, MKL ...) runs on one thread inside it.

    The OOD scores' matrix products are small (a batch against a few thousand stored features);
    with one BLAS thread per core, OpenBLAS's idle threads kept spinning after each product and
    took the cores from ONNX Runtime and the image decoders (the cascade ran 292 images/s at 6.6 ms
    of CPU per image, 350-400 at 4.4-5.0 with one BLAS thread; bench/predict_speed.py).
    """
    global _BLAS
    from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn

    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def load_bundle(path: Path | str) -> Bundle:
    """Load a bundle directory or ``.zip`` of any kind; ``"default"`` (when no such path exists)
    is the model shipped with the package.

    Raises:
        BundleError: missing files, invalid config, unknown kind or unreadable format version,
            each with a message that says what to do.
    """
    if str(path) == DEFAULT_NAME and not Path(path).exists():
        from hematoscope.models.default import default_bundle_path

        path = default_bundle_path()
    path = Path(path)
    if not path.exists():
        raise BundleError(f"no bundle at {path}")
    if path.is_file() and path.suffix.lower() == ".zip":
        from hematoscope.data.archive import extract_zip_safely

        target = _zip_cache_dir(path)
        if not (target / "config.json").exists():
            with _io.atomic_dir(target) as d:
                extract_zip_safely(path, d)
        return _load_dir(target, origin=path)
    if not path.is_dir():
        raise BundleError(f"{path} is neither a bundle directory nor a .zip")
    return _load_dir(path, origin=path)


def _load_dir(directory: Path, origin: Path) -> Bundle:
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise BundleError(f"{origin} has no config.json: not a hematoscope bundle")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{cfg_file} is not valid JSON ({exc})") from None
    version = raw.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = "upgrade hematoscope" if newer else "re-export it with a current hematoscope"
        raise BundleError(
            f"{origin}: bundle format_version {version!r} is not readable by this hematoscope "
            f"(reads {list(READABLE_FORMAT_VERSIONS)}); {hint}"
        )
    try:
        config = BundleConfig.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: keep its field-by-field message
        raise BundleError(f"{cfg_file} is invalid: {exc}") from None
    metrics_file = directory / "metrics.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    bundle = bundle_class(config.kind)._load_weights(config, directory, metrics)
    bundle.path = origin
    if config.ood is not None:
        from hematoscope.trust import load_scorer

        bundle.ood = load_scorer(config.ood, directory)
    return bundle


def _zip_cache_dir(zip_path: Path) -> Path:
    from hematoscope.paths import cache_dir

    return cache_dir("bundles") / _io.file_sha256(zip_path)[:24]


class _tmp_dir:
    def __enter__(self) -> Path:
        import tempfile

        self._td = tempfile.TemporaryDirectory(prefix="hematoscope-")
        return Path(self._td.name)

    def __exit__(self, *exc) -> None:
        self._td.cleanup()
