"""The model bundle: a directory that carries a model, its preprocessing, labels and metrics.

Layout (every kind)::

    config.json        BundleConfig (validated by pydantic on load; no executable strings)
    metrics.json       metrics with the split they were measured on
    README.md          model card generated from config + metrics
    <weights>          kind-specific: model.safetensors, head.safetensors, xgboost.json ...
    ood.safetensors    optional out-of-distribution scorer state (see :mod:`.ood`)

``load_bundle`` reads ``config.json``, checks ``format_version`` and dispatches on ``kind`` to
the class registered with :func:`register_bundle_kind`. Downstream code (predict, evaluate,
serve, export, trust, explain) only ever talks to :class:`Bundle`, and asks it what it can do
(views, backends, explanations, a torch network) instead of asking its kind.
:meth:`Bundle.save` is the one way to disk.
"""
from __future__ import annotations

import functools
import json
import logging
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np

from hematoscope import _io
from hematoscope._registry import Registry
from hematoscope.bundle.config import (DEFAULT_NAME, FORMAT_VERSION, READABLE_FORMAT_VERSIONS,  # noqa: F401
                                       BundleConfig, CascadeRule, ViewTrust)
from hematoscope.bundle.prediction import LOW_CONFIDENCE, UNLIKE_TRAINING, Prediction
from hematoscope.models.preprocess import TTA_VIEWS, recolour_image, reframe_image

if TYPE_CHECKING:
    from hematoscope.data.decode import DecodedBatch
    from hematoscope.data.sources import ImageSource, SkippedFile

log = logging.getLogger("hematoscope")


class BundleError(ValueError):
    """A bundle directory is missing, malformed or from an incompatible version."""


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


@dataclass
class ModelOutput:
    """Raw model output for a batch: ``logits`` (N, C) and optional ``features`` (N, D)
    (penultimate-layer features, used by out-of-distribution scorers)."""

    logits: np.ndarray
    features: np.ndarray | None = None


@dataclass
class ViewOutputs:
    """Raw outputs of the first V test-time views of N images: ``logits`` (V, N, C) and
    ``features`` (V, N, D) or None. View 0 is the image itself."""

    logits: np.ndarray
    features: np.ndarray | None = None

    @property
    def views(self) -> int:
        return int(self.logits.shape[0])

    def __len__(self) -> int:
        return int(self.logits.shape[1])

    def averaged(self, n: int) -> ModelOutput:
        """Outputs averaged over the first ``n`` views (what a bundle with ``tta = n`` gives).

        Raises:
            ValueError: fewer than ``n`` views were computed.
        """
        if not 1 <= n <= self.views:
            raise ValueError(f"{n} views asked for, {self.views} computed")

        def avg(a: np.ndarray) -> np.ndarray:
            return np.asarray(a[0] if n == 1 else np.mean(a[:n], axis=0), dtype=np.float32)

        return ModelOutput(avg(self.logits), None if self.features is None else avg(self.features))

    def take(self, index: np.ndarray) -> "ViewOutputs":
        return ViewOutputs(self.logits[:, index], None if self.features is None else self.features[:, index])

    @classmethod
    def concat(cls, parts: Sequence["ViewOutputs"]) -> "ViewOutputs":
        has_features = all(p.features is not None for p in parts)
        return cls(np.concatenate([p.logits for p in parts], axis=1),
                   np.concatenate([p.features for p in parts], axis=1) if has_features else None)


def cascade_gate(confidence: np.ndarray, ood_score: np.ndarray, *, min_confidence: float,
                 max_ood: float | None, reject_ood: float | None) -> np.ndarray:
    """Cells whose fast answer is uncertain: confidence below ``min_confidence`` or OOD score
    above ``max_ood``, except those already past ``reject_ood`` (flagged without more views)."""
    with np.errstate(invalid="ignore"):
        uncertain = confidence < min_confidence
        if max_ood is not None:
            uncertain |= ood_score > max_ood
        if reject_ood is not None:
            uncertain &= ~(ood_score > reject_ood)
    return uncertain


def calibrated_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, in float64."""
    from scipy.special import softmax

    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


#: Bundle classes by kind; the built-in kinds' modules are imported on demand by load_bundle.
_KINDS: Registry[type["Bundle"]] = Registry("bundle kind", error=BundleError, lazy={
    "neural": "hematoscope.bundle.neural",
    "fewshot": "hematoscope.fewshot.bundle",
    "classical": "hematoscope.classical.bundle",
})


#: Explainer factories by method; the built-in ones' modules are imported on first use.
_EXPLAINERS: Registry[Callable[["Bundle"], Any]] = Registry("explanation method", error=BundleError, lazy={
    "grad-cam": "hematoscope.explain.gradcam",
    "segmentation": "hematoscope.classical.explain",
})
#: The libraries each built-in method imports, checked without importing them
#: (:attr:`Bundle.available_explanations`).
_EXPLAINER_MODULES = {"grad-cam": ("torch", "timm", "pytorch_grad_cam"), "segmentation": ("skimage",)}
#: Fewest training images a framing-search size reference is measured on.
MIN_SIZE_IMAGES = 50


def register_explainer(method: str) -> Callable[[Callable], Callable]:
    """Decorator: ``factory(bundle) -> explainer`` for ``method``; an explainer's
    ``explain(images, classes, *, max_side=None)`` returns one
    :class:`~hematoscope.bundle.prediction.Explanation` per image."""
    return _EXPLAINERS.register(method)


def class_index(labels: Sequence[str], c: int | str) -> int:
    """The index in ``labels`` of a class given by name or index.

    Raises:
        ValueError: a name or an index that is not one of ``labels``.
    """
    if isinstance(c, str):
        if c not in labels:
            raise ValueError(f"{c!r} is not a class of this bundle ({', '.join(labels)})")
        return list(labels).index(c)
    if not 0 <= int(c) < len(labels):
        raise ValueError(f"class index {c} out of range 0..{len(labels) - 1}")
    return int(c)


def explained_classes(bundle: "Bundle", images: Sequence[np.ndarray],
                      classes: Sequence[int | str | None] | None) -> tuple[list[int], "Prediction | None"]:
    """What an explainer explains for each image, as label indices: a class given by name or
    index, or for None (all of ``classes``, or an entry) the bundle's own answer; with the
    :class:`Prediction` those answers came from (None when every class was given).

    Raises:
        ValueError: a class that is not one of the bundle's, or a count that does not match.
    """
    wanted = [None] * len(images) if classes is None else list(classes)
    if len(wanted) != len(images):
        raise ValueError(f"{len(images)} images but {len(wanted)} classes")
    answer = None
    if any(c is None for c in wanted):
        answer = bundle.predict_arrays(list(images), [f"image_{i}" for i in range(len(images))])
    return [class_index(bundle.labels, answer.predicted[i] if c is None else c) for i, c in enumerate(wanted)], answer


def register_bundle_kind(kind: str) -> Callable[[type["Bundle"]], type["Bundle"]]:
    """Class decorator: make ``load_bundle`` build this class for ``config.kind == kind``."""
    return _KINDS.register(kind, kind=kind)


def bundle_class(kind: str) -> type["Bundle"]:
    return _KINDS.get(kind)


def _other_kind_files(directory: Path, kind: str) -> set[str]:
    """The weight files of the bundle of another kind than ``kind`` that ``directory`` holds
    (none when it holds no bundle, one of ``kind``, or one this version cannot read)."""
    try:
        other = json.loads((directory / "config.json").read_text()).get("kind")
        return set(bundle_class(other).weight_files) if other and other != kind else set()
    except (OSError, ValueError, AttributeError, BundleError):
        return set()


class Bundle(ABC):
    """A trained classifier plus everything needed to use it. Subclasses implement
    :meth:`forward`, :meth:`_save_weights` and :meth:`_load_weights`."""

    kind: ClassVar[str] = ""
    #: Whether :meth:`forward` averages ``config.tta`` test-time views.
    supports_tta: ClassVar[bool] = False
    #: How this kind's answers can be explained, best first (see :meth:`explainer`).
    explanation_methods: ClassVar[tuple[str, ...]] = ()
    #: Inference backends the kind can switch between (see :meth:`use_backend`).
    backends: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`adapt` can change the model itself for a new lab (its framing, statistics
    #: or weights). A kind that cannot would only refit its OOD flag to the lab's cells, which
    #: hides the shift instead of correcting it, so adapting it is refused.
    adaptable: ClassVar[bool] = False

    def __init__(self, config: BundleConfig, metrics: dict | None = None, path: Path | None = None):
        self.config = config
        self.metrics = metrics or {}
        self.path = path
        #: The directory its files were read from (a zip's unpacked copy); None when not loaded.
        self.directory: Path | None = None
        self.preprocess = config.preprocess
        self.ood = None  # a fitted scorer from hematoscope.bundle.ood, or None
        #: Fixed view count forced by set_tta (None: the bundle's default, the cascade when fitted).
        self._forced_views: int | None = None
        #: The view count the bundle-wide trust settings were fitted for (set_tta changes
        #: config.tta, not this; fitting trust does).
        self.trust_views: int = config.tta
        self._mode_scorers: dict = {}
        self._warned: set = set()
        #: 1.0 for the classes answers may name, 0.0 for the others (None: every label).
        self._answerable: np.ndarray | None = None
        self.restrict_classes(None)
        #: The confidence cut a caller chose for every view count (None: as fitted per view count).
        self._abstain_below: float | None = None

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

    def forward_views(self, images: Sequence[np.ndarray], views: int = 1) -> ViewOutputs:
        """Raw outputs of each of the first ``views`` test-time views, not averaged (view 0 = the
        image itself). Kinds without views give their one view.

        Raises:
            BundleError: more views than the kind has (see :attr:`max_views`).
        """
        if views != 1:
            raise BundleError(f"{self.kind!r} bundles do not support test-time views (asked for {views})")
        out = self.forward(images)
        return ViewOutputs(out.logits[None], None if out.features is None else out.features[None])

    def explainer(self, method: str | None = None):
        """An explainer of this bundle's answers: ``explain(images, classes, *, max_side=None)``
        gives one :class:`~hematoscope.bundle.prediction.Explanation` per image (Grad-CAM for
        networks, outlines and SHAP on named features for classical bundles). Callers ask for it
        instead of asking which kind the bundle is.

        Args:
            method: one of :attr:`explanation_methods`; None = the first.

        Raises:
            BundleError: the kind has no (such) explanation.
            ImportError: the method's libraries are not installed.
        """
        if not self.explanation_methods:
            raise BundleError(f"explanations are not available for {self.kind!r} models")
        method = method or self.explanation_methods[0]
        if method not in self.explanation_methods:
            raise BundleError(f"{self.kind!r} bundles explain with {list(self.explanation_methods)}, not {method!r}")
        return _EXPLAINERS.get(method)(self)

    @property
    def available_explanations(self) -> list[str]:
        """The :attr:`explanation_methods` whose libraries are installed here (cheap: nothing
        is imported), e.g. none for a neural bundle on a base install without the explain extra."""
        from hematoscope._extras import available

        return [m for m in self.explanation_methods if available(*_EXPLAINER_MODULES.get(m, ()))]

    def use_backend(self, backend: str | None, *, threads: int | None = None) -> None:
        """Run inference with ``backend`` (one of :attr:`backends`, ``"auto"``, or None for the
        environment's choice) on ``threads`` intra-op threads. Kinds with one way to run accept
        only ``"auto"`` and None.

        Raises:
            BundleError: the kind cannot run on ``backend``.
        """
        if backend not in (None, "auto"):
            raise BundleError(f"{self.kind!r} bundles have no {backend!r} backend")

    @property
    def active_backend(self) -> str:
        """What runs inference now: a backend of :attr:`backends`, else the kind's own engine
        (named by the kind)."""
        return self.kind

    def torch_module(self):
        """The torch network (``images -> (logits, features)``) for export and Grad-CAM.

        Raises:
            BundleError: the kind has no torch network.
        """
        raise BundleError(f"{self.kind!r} bundles have no torch network")

    def _adapt_statistics(self, images: Sequence[np.ndarray], *, batch_size: int = 64,
                          mix: float | None = None) -> dict:
        """Re-estimate the model's normalisation statistics on a new lab's images, in place, as
        ``mix`` * new + (1 - ``mix``) * trained (None: the kind chooses); returns what changed
        (JSON-able). Kinds without such statistics change nothing."""
        return {}

    def _tune_unlabelled(self, images: Sequence[np.ndarray], *, classes: Sequence[int], epochs: int,
                         seed: int = 0, class_mix: Sequence[float] | None = None) -> dict:
        """Tune the model on a new lab's unlabelled images, answers among ``classes`` (output
        indices) in about the shares ``class_mix`` (None = equal), in place; returns what was
        done (JSON-able)."""
        raise BundleError(f"{self.kind!r} bundles cannot be tuned on unlabelled images; adapt without tuning")

    def adapt(self, images: Iterable, *, source: str = "unnamed images", name: str | None = None,
              target_tpr: float = 0.95, mix: float | None = None, classes: Sequence[str] | None = None,
              tune_epochs: int = 0, framing: float | str | None = "auto", class_mix: str = "estimated") -> "Bundle":
        """A copy of this bundle adapted to a new lab from its unlabelled cell crops (paths,
        bytes or arrays): the framing chosen for them, normalisation statistics and the OOD
        reference and threshold refitted, nothing else; with ``tune_epochs``, the network is also
        tuned on them among ``classes``, towards the lab's estimated ``class_mix``. See
        :func:`hematoscope.bundle.adapt.adapt_bundle`.

        Raises:
            BundleError: too few readable images, unknown classes, a kind that cannot be tuned.
        """
        from hematoscope.bundle.adapt import adapt_bundle

        return adapt_bundle(self, images, source=source, name=name, target_tpr=target_tpr, mix=mix,
                            classes=classes, tune_epochs=tune_epochs, framing=framing, class_mix=class_mix)[0]

    # --- common behaviour ----------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def trained_class_mix(self) -> np.ndarray | None:
        """Share of each label among the training images (``config.training.train_class_counts``),
        in label order; None where the bundle does not record them."""
        counts = self.config.training.train_class_counts
        if set(counts) != set(self.labels) or sum(counts.values()) <= 0:
            return None
        shares = np.array([counts[label] for label in self.labels], np.float64)
        return shares / shares.sum()

    @property
    def max_views(self) -> int:
        """Most test-time views this bundle can average (8 for kinds with views, else 1)."""
        return max(TTA_VIEWS) if self.supports_tta else 1

    def set_tta(self, views: int) -> None:
        """Average ``views`` flip/rot90 views per image from now on (1 = off).

        Raises:
            BundleError: the kind has no test-time views (other than the count it always runs:
                a no-op), or ``views`` is not 1, 2, 4 or 8.
        """
        if not self.supports_tta:
            if views == self.views_per_image:
                return
            fixed = self.views_per_image
            raise BundleError(f"{self.kind} bundle {self.name!r} sees each image in {fixed} view{'s' * (fixed > 1)}, "
                              "fixed when it was made; test-time views cannot change that")
        if views not in TTA_VIEWS:
            raise BundleError(f"test-time views must be one of {TTA_VIEWS}; got {views}")
        self.config.tta = views
        self._forced_views = views

    def restrict_classes(self, classes: Sequence[str] | None) -> None:
        """Answer only among ``classes`` from now on (None: the bundle's own default, all of
        :attr:`labels` unless it was adapted to a lab whose crops hold fewer: ``adapt --classes``).

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
            classes = (self.config.adaptation or {}).get("classes")
            if classes is None or set(classes) == set(self.labels):
                self._answerable = None
                return
        wanted = self.class_subset(classes)
        self._answerable = np.array([float(c in wanted) for c in self.labels])

    def _retire_view_trust(self) -> bool:
        """Drop the per-view trust entries and the cascade once the bundle-wide trust settings (or
        the network under them) changed: they were fitted with the old ones and no longer apply.
        Returns whether there were any."""
        cfg = self.config
        had = bool(cfg.view_trust or cfg.cascade)
        cfg.view_trust, cfg.view_trust_of, cfg.cascade = {}, None, None
        self._mode_scorers, self._warned = {}, set()
        return had

    def class_subset(self, classes: Sequence[str]) -> list[str]:
        """``classes`` stripped, without repeats, checked to be at least 2 of :attr:`labels`; a
        taxonomy synonym, display name or other case of a label stands for it ("Neutrophils").

        Raises:
            BundleError: a name that is not one of the bundle's labels, or fewer than 2 classes.
        """
        from hematoscope.taxonomy import TAXONOMY

        def label_of(name: str) -> str:
            if name in self.labels:
                return name
            canonical = TAXONOMY.canonical(None, name)
            return canonical if canonical in self.labels else name

        wanted = list(dict.fromkeys(label_of(c.strip()) for c in classes if c.strip()))
        unknown = [c for c in wanted if c not in self.labels]
        if unknown:
            raise BundleError(f"not classes of {self.name!r}: {', '.join(unknown)}; "
                              f"its classes are {', '.join(self.labels)}")
        if len(wanted) < 2:
            raise BundleError(f"a subset of classes needs at least 2 of {', '.join(self.labels)}; got {wanted}")
        return wanted

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
        return "cascade" if self.uses_cascade else str(self.views_per_image)

    @property
    def views_per_image(self) -> int:
        """Views each image is seen in when no cascade runs (a kind whose features are averaged
        over views elsewhere says so)."""
        return self.config.tta

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
        ood_threshold = None if cfg.ood is None else cfg.ood.threshold
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
            levels = {} if cfg.ood is None else cfg.ood.accept_levels or {}
            return TrustSettings(views, cfg.temperature, self._cut(cfg.abstain_threshold),
                                 self._accept_threshold(levels, ood_threshold), {}, why)
        return TrustSettings(views, entry.temperature, self._cut(entry.abstain_threshold),
                             self._accept_threshold(entry.ood_accept_levels, entry.ood_threshold),
                             dict(entry.ood_params))

    def set_abstain_below(self, cut: float | None) -> None:
        """Abstain on every cell whose calibrated top probability is below ``cut``, whatever the
        view count (None: the cut fitted for each). Only this cut moves: the temperature, the OOD
        flag, the per-view trust and the cascade stay as fitted. Not saved with the bundle.

        Raises:
            BundleError: ``cut`` outside [0, 1].
        """
        if cut is not None and not 0.0 <= float(cut) <= 1.0:
            raise BundleError(f"the abstain cut is a probability in [0, 1]; got {cut!r}")
        self._abstain_below = None if cut is None else float(cut)

    def _cut(self, fitted: float) -> float:
        return fitted if self._abstain_below is None else self._abstain_below

    def _accept_threshold(self, levels: dict[str, float], fitted: float | None) -> float | None:
        accept = self.config.ood_accept
        if accept is None or fitted is None:
            return fitted
        if str(accept) not in levels:  # checked by set_ood_accept; a hand-edited config can still lack it
            raise BundleError(f"bundle {self.name!r} has no OOD threshold stored for accepting {accept:g} of its "
                              "validation cells; refit its trust (`hematoscope trust fit`) or unset ood_accept")
        return float(levels[str(accept)])

    def set_ood_accept(self, share: float | None) -> None:
        """Move the OOD flag's operating point: from now on it accepts ``share`` of the cells
        the bundle's trust was fitted on (one of ``OOD_ACCEPT_LEVELS``), for every view count,
        with thresholds stored at fitting time, so no training data is needed; None = as fitted.
        Looser answers more of another lab's cells and lets more damaged cells through; saved
        with the bundle.

        Raises:
            BundleError: the bundle has no OOD flag, or was fitted before thresholds per share were
                stored (refit with ``hematoscope trust fit``), or ``share`` is not a stored level.
        """
        from hematoscope.bundle.ood import OOD_ACCEPT_LEVELS

        cfg = self.config
        if share is None:
            cfg.ood_accept = None
            return
        share = float(share)
        if share not in OOD_ACCEPT_LEVELS:
            raise BundleError(f"the OOD flag can be set to accept {', '.join(map(str, OOD_ACCEPT_LEVELS))} of the "
                              f"validation cells, not {share!r}")
        if self.ood is None or cfg.ood is None or cfg.ood.threshold is None:
            raise BundleError(f"bundle {self.name!r} has no OOD flag to set (hematoscope trust fit)")
        offered = self.ood_accept_shares()
        if not offered:
            raise BundleError(f"bundle {self.name!r} was fitted before OOD thresholds per accepted share were stored; "
                              "refit its trust (`hematoscope trust fit BUNDLE SPLIT`) to move its operating point")
        if share not in offered:
            raise BundleError(f"bundle {self.name!r} offers the OOD flag at {', '.join(map(str, offered))}, not "
                              f"{share:g}: its flag was set on too few cells to estimate that share (an adapted "
                              "bundle's held-out crops; adapt on more crops for it)")
        cfg.ood_accept = share

    def at_ood_accept(self, share: float | None) -> "Bundle":
        """This bundle with its OOD flag at another operating point (:meth:`set_ood_accept`), as a
        new object sharing the weights, the runner and the fitted scorer; this one is unchanged.
        For a server whose requests each choose how strict the flag is.

        Raises:
            BundleError: as :meth:`set_ood_accept`.
        """
        other = self.twin()
        other.set_ood_accept(share)
        return other

    def twin(self) -> "Bundle":
        """This bundle as a new object sharing the weights, the runner and the fitted scorer,
        with a config of its own: its settings (operating point, framing, views) change without
        touching this one, which may be serving predictions meanwhile."""
        import copy

        other = copy.copy(self)
        other.config = self.config.model_copy(deep=True)
        other._mode_scorers, other._warned = {}, set()
        return other

    def ood_accept_shares(self) -> list[float]:
        """The shares :meth:`set_ood_accept` can move the OOD flag to: those with a threshold
        stored bundle-wide and for every per-view entry in use ([] for a bundle without them)."""
        from hematoscope.bundle.ood import OOD_ACCEPT_LEVELS

        cfg = self.config
        if cfg.ood is None:
            return []
        stores = [cfg.ood.accept_levels or {}]
        if cfg.view_trust_of == cfg.trust_fingerprint():  # stale entries are not used (trust_for)
            stores += [e.ood_accept_levels for e in cfg.view_trust.values()]
        return [q for q in OOD_ACCEPT_LEVELS if all(str(q) in levels for levels in stores)]

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
        workers: int | None = None,
        progress: str | None = None,
        warn_skipped: bool = True,
    ) -> Prediction:
        """Classify images given as arrays, paths or encoded bytes.

        Files and bytes are decoded with :func:`~hematoscope.data.images.load_model_image`, as on
        every other path (CLI, server, evaluate, trust fit), in threads while the model runs
        (:meth:`iter_predictions`). Unreadable inputs are listed in ``Prediction.skipped`` with
        their reason; the others are answered. Probabilities are temperature-calibrated;
        abstention combines the confidence threshold and the OOD flag. ``progress``: a
        description to show a progress bar under (:func:`hematoscope.progress.track`).
        With ``warn_skipped``, unreadable inputs also raise a warning: the result then has fewer
        rows than inputs, and rows must be matched to inputs by ``Prediction.sources``.
        """
        items = image_sources(images, sources)
        parts = self.iter_predictions(items, batch_size=batch_size, workers=workers)
        if progress is not None:
            from hematoscope.progress import track

            parts = track(parts, total=-(-len(items) // batch_size), description=progress)
        pred = Prediction.concat(list(parts), self.labels)
        if warn_skipped and pred.skipped:
            import warnings

            first = "; ".join(f"{s.source}: {s.reason}" for s in pred.skipped[:3])
            warnings.warn(f"{len(pred.skipped)} of {len(items)} inputs could not be read and have no row ({first}"
                          f"{'; ...' if len(pred.skipped) > 3 else ''}): match rows to inputs by "
                          "Prediction.sources, not by position (Prediction.skipped lists them all)",
                          UserWarning, stacklevel=2)
        return pred

    def iter_batches(self, items: Iterable["ImageSource | SkippedFile"], *, batch_size: int = 64,
                     workers: int | None = None) -> Iterator["DecodedBatch"]:
        """``items`` decoded for this bundle, batch by batch, in threads ahead of the consumer
        (:func:`hematoscope.data.decode.decode_batches`): the one decode-and-run loop."""
        from hematoscope.data.decode import decode_batches

        return decode_batches(items, self.preprocess, batch_size=batch_size, workers=workers)

    def iter_predictions(self, items: Iterable["ImageSource | SkippedFile"], *, batch_size: int = 64,
                         workers: int | None = None) -> Iterator[Prediction]:
        """One :class:`Prediction` per batch of ``items`` (see :func:`image_sources` and
        :func:`~hematoscope.data.sources.expand_paths`), its ``skipped`` listing the batch's
        unreadable inputs. Memory stays flat however many images there are."""
        for batch in self.iter_batches(items, batch_size=batch_size, workers=workers):
            pred = self.predict_arrays(batch.images, batch.sources)
            pred.skipped = list(batch.skipped)
            yield pred

    def iter_view_outputs(self, items: Iterable["ImageSource | SkippedFile"], *, views: int = 1,
                          batch_size: int = 64, workers: int | None = None
                          ) -> Iterator[tuple["DecodedBatch", ViewOutputs]]:
        """Raw outputs of the first ``views`` test-time views (:meth:`forward_views`) for each
        batch of ``items`` that has readable images, with the batch."""
        for batch in self.iter_batches(items, batch_size=batch_size, workers=workers):
            if batch.images:
                yield batch, self.forward_views(batch.images, views)

    def predict_arrays(self, images: Sequence[np.ndarray], sources: Sequence[str]) -> Prediction:
        """Classify one batch of decoded RGB uint8 arrays."""
        if len(images) == 0:
            return Prediction.empty(self.labels)
        if not self.reframes:
            return self.decide(self.forward(images), sources)
        views = self.config.tta
        return self._reframe(images, sources, self.decide(self.forward_views(images, views).averaged(views), sources,
                                                          views), views)

    def set_framing(self, share: float) -> None:
        """Make the model see ``share`` of each image's side (``Preprocess.framing``: below 1 the
        centre, above 1 the image padded into a larger frame), in the config and the input spec
        its kind runs; saved with the bundle."""
        from dataclasses import replace

        self.preprocess = self.config.preprocess = replace(self.preprocess, framing=float(share))

    @property
    def reframes(self) -> bool:
        """Whether predictions run the framing search (:class:`ReframeRule`, needs an OOD scorer)."""
        return self.config.reframe is not None and self.ood is not None

    def set_reframe(self, zooms: Sequence[float] | None, out_margin: float | None = None, *,
                    size_images: Sequence[np.ndarray] | None = None, size_ref: float | None = None,
                    colours: Sequence[tuple[str, float]] = ()) -> None:
        """Turn the framing search on with these framings (shares of the side: centre crops below
        1, padded frames above, e.g. ``[0.85, 0.75, 0.6, 1.5, 2, 2.5]``) or off (None); saved
        with the bundle. ``out_margin``: see :class:`ReframeRule` (default: the rule's).
        ``size_images``: decoded training images (a few hundred); their median stained share
        becomes the rule's ``size_ref``, so tight crops also try a padded frame of their size;
        ``size_ref`` sets that reference directly (e.g. kept from a previous rule); ``colours``:
        the rule's colour changes (:meth:`set_recolour`)."""
        from hematoscope.bundle.config import ReframeRule

        if zooms is None:
            self.config.reframe = None
            return
        extra = {} if out_margin is None else {"out_margin": out_margin}
        if size_ref is not None:
            extra["size_ref"] = size_ref
        if colours:
            extra["colours"] = list(colours)
        if size_images is not None:
            if len(size_images) < MIN_SIZE_IMAGES:
                raise ValueError(f"the size reference needs at least {MIN_SIZE_IMAGES} training images, "
                                 f"got {len(size_images)}")
            ref = float(np.median(self.preprocess.stained_share(size_images)))
            if ref <= 0:
                raise ValueError("the size reference images hold no stained nuclei (dark purple pixels after "
                                 "colour canonicalisation): are they stained blood-cell crops?")
            extra["size_ref"] = round(ref, 5)
        self.config.reframe = ReframeRule(zooms=list(zooms), **extra)

    def set_recolour(self, colours: Sequence[tuple[str, float]] | None = None) -> None:
        """Let the framing search also try colour changes (``ReframeRule.colours``; default
        :data:`~hematoscope.bundle.config.DEFAULT_RECOLOURS`; ``[]`` turns them off) on cells
        still flagged after the framings; saved with the bundle.

        Raises:
            ValueError: the bundle has no framing search (:meth:`set_reframe`, needs an OOD scorer).
        """
        if not self.reframes:
            raise ValueError(f"colour changes are tried by the framing search, which {self.name!r} does not run "
                             "(it needs an OOD scorer and Bundle.set_reframe)")
        rule = self.config.reframe
        self.config.reframe = rule.with_colours() if colours is None else rule.with_colours(colours)

    def _mark_unsearched(self, pred: Prediction) -> None:
        """``pred``'s framing-search columns before any search: whole crops in their own colours."""
        pred.framing = np.ones(len(pred))
        pred.recolour = np.full(len(pred), "", dtype=object) if self.config.reframe.colours else None

    def _reframe(self, images: Sequence[np.ndarray], sources: Sequence[str], pred: Prediction,
                 views: int) -> Prediction:
        """The framing search (:class:`ReframeRule`) on one batch answered from ``views`` views:
        each image ``pred`` flags as unlike training data is run again on the rule's centre crops
        and, when its stained share says the crop is framed tight (``size_ref``), on its crop
        padded to the size the model knows; it is answered from the framing with the lowest OOD
        score. One still flagged then tries the rule's padded framings, kept only ``out_margin``
        under the threshold, and then the rule's colour changes at the whole crop, the centre crops
        and its size's padded frame, each competing on the lowest OOD score. Returns ``pred``
        updated, ``framing`` (and with colour changes ``recolour``) filled in."""
        from hematoscope.bundle.config import SIZE_PAD_MAX, SIZE_SHARE_MAX

        rule = self.config.reframe
        self._mark_unsearched(pred)
        take = np.flatnonzero(pred.ood_flag)
        if len(take) == 0:
            return pred
        trust = self.trust_for(views)
        scorer = self._scorer_for(trust)
        score, share = pred.ood_score.copy(), pred.framing
        chosen: dict[int, ViewOutputs] = {}

        @functools.cache
        def look(i: int, colour: tuple[str, float] | None) -> np.ndarray:
            """Image ``i`` with ``colour`` changed: once per cell and change, however many framings try it."""
            image = self.preprocess.prepare(images[i])  # bars filled before any framing pads the crop
            return image if colour is None else recolour_image(image, *colour)

        def still_flagged() -> np.ndarray:
            return np.array([i for i in take if score[i] > trust.ood_threshold], dtype=np.int64)

        def search(rows: np.ndarray, zooms: np.ndarray, good_enough: float,
                   colours: Sequence[tuple[str, float] | None] | None = None) -> None:
            """``zooms``: (framings, rows) shares, one column per cell; ``colours``: the colour
            change of each framing row (None: the image's own colours)."""
            colours = colours or [None] * len(zooms)
            looks = [reframe_image(look(int(i), c), z) for zs, c in zip(zooms, colours) for z, i in zip(zs, rows)]
            # every framing of every cell in one batch: a few flagged cells per batch cost model calls, not pixels
            tried = self.forward_views(looks, views)
            mean = tried.averaged(views)
            with single_blas_thread():
                s = np.asarray(scorer.score(features=mean.features, logits=mean.logits), dtype=np.float64)
            s = s.reshape(len(zooms), len(rows))
            best = s.argmin(0)
            for j, i in enumerate(rows):
                if s[best[j], j] < min(score[i], good_enough):
                    k = best[j] * len(rows) + j
                    score[i], share[i] = s[best[j], j], zooms[best[j], j]
                    if pred.recolour is not None:
                        c = colours[best[j]]
                        pred.recolour[i] = "" if c is None else f"{c[0]} {c[1]:g}"
                    chosen[i] = ViewOutputs(tried.logits[:, k:k + 1],
                                            None if tried.features is None else tried.features[:, k:k + 1])

        def each(zooms: list[float], rows: np.ndarray) -> np.ndarray:
            return np.repeat(np.asarray(zooms, dtype=np.float64)[:, None], len(rows), axis=1)

        closer = [z for z in rule.zooms if z < 1]
        if closer:
            search(take, each(closer, take), np.inf)
        pad = None  # per flagged cell, the padded frame of its size (1: framed as the training crops)
        if rule.size_ref is not None:
            stained = self.preprocess.stained_share([images[i] for i in take])
            tightness = np.sqrt(stained / rule.size_ref)
            tight = (tightness >= rule.size_gate) & (stained <= SIZE_SHARE_MAX)
            pad = np.where(tight, np.round(np.minimum(tightness, SIZE_PAD_MAX), 2), 1.0)
            if tight.any():
                search(take[tight], pad[tight][None, :], np.inf)
        looser = [z for z in rule.zooms if z > 1]
        still = still_flagged()
        if looser and len(still):
            search(still, each(looser, still), float(trust.ood_threshold) - rule.out_margin)
        still = still_flagged()
        if rule.colours and len(still):
            # each colour change at every framing tried: a stain and a framing difference come together
            framed = [np.ones(len(still))] + [np.full(len(still), z) for z in closer]
            own_pad = None if pad is None else pad[np.searchsorted(take, still)]
            if own_pad is not None and (own_pad != 1).any():
                framed.append(own_pad)
            framed = np.stack(framed)
            search(still, np.tile(framed, (len(rule.colours), 1)), np.inf,
                   [tuple(c) for c in rule.colours for _ in framed])
        index = np.array(sorted(chosen), dtype=np.int64)
        if len(index) == 0:
            return pred
        outs = ViewOutputs.concat([chosen[i] for i in index])
        pred.replace(index, self.decide(outs.averaged(views), [sources[i] for i in index], views))
        return pred

    def calibrated_probs(self, logits: np.ndarray, views: int | None = None) -> np.ndarray:
        """Temperature-scaled probabilities, with the temperature fitted for ``views`` views,
        renormalised over the answerable classes (:meth:`restrict_classes`)."""
        return self._answerable_only(calibrated_softmax(logits, self.trust_for(views).temperature))

    def _answerable_only(self, probs: np.ndarray) -> np.ndarray:
        if self._answerable is None:
            return probs
        probs = probs * self._answerable
        return probs / np.maximum(probs.sum(1, keepdims=True), np.finfo(np.float64).tiny)

    def decide(self, out: ModelOutput, sources: Sequence[str], views: int | None = None) -> Prediction:
        """Turn raw outputs of ``views`` averaged views (default ``config.tta``) into calibrated
        probabilities, OOD flags and abstain decisions, with the trust fitted for that view count."""
        trust = self.trust_for(views)
        probs = self._answerable_only(calibrated_softmax(out.logits, trust.temperature))
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
        # a kind that averages views elsewhere (a few-shot backbone's) reports its own count
        seen = trust.views if self.supports_tta else self.views_per_image
        return Prediction(self.labels, probs, list(sources), score, flag, flag | low, reasons,
                          views=np.full(n, seen, dtype=np.int8))

    # --- persistence -------------------------------------------------------------------
    #: Top-level files (or folders) a kind may write besides config.json, metrics.json,
    #: README.md and ood.safetensors: :meth:`save` removes those the bundle no longer has.
    weight_files: ClassVar[tuple[str, ...]] = ()

    def save(self, path: Path | str) -> Path:
        """Write the bundle to a directory, or to a ``.zip`` when ``path`` ends so; returns ``path``.

        This is the one way a bundle reaches disk (training, few-shot, trust fitting, adaptation
        and ONNX export all use it). A new directory or a zip is written whole and atomically.
        Into an existing directory only the files whose bytes changed are replaced, each
        atomically, ``config.json`` last: after a trust refit ``model.safetensors`` keeps its
        bytes and its mtime. Files of the format that the bundle no longer has (an OOD scorer it
        dropped, an ONNX export that no longer matches its weights) are removed; files the
        format does not know are left alone; over a bundle of another kind, that kind's files go too.
        Saving back where the bundle was loaded from keeps
        what it does not write itself (e.g. ``model.onnx``), zip included.

        The bundle object does not change: ``path`` still names where it was loaded from (load the
        saved copy to work with that).
        """
        from hematoscope import __version__

        path = Path(path)
        self.config.hematoscope_version = __version__
        kept = self._kept_files(path)
        if path.suffix.lower() == ".zip":
            with _io.atomic_path(path, ".zip") as tmp_zip, _tmp_dir() as d:
                self._write_files(d)
                written = {f.relative_to(d).as_posix(): f for f in d.rglob("*") if f.is_file()}
                with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                    for name, f in sorted({**kept, **written}.items()):
                        zf.write(f, name)
            return path
        remove = (self._format_files() | _other_kind_files(path, self.kind)) - set(kept)
        with _io.updated_dir(path, remove=remove, last=("config.json",)) as d:
            self._write_files(d)
        return path

    def _home(self, target: Path) -> Path | None:
        """The directory the bundle's files were read from, when ``target`` is where it was
        loaded from (that directory, or the zip it was unpacked from); else None."""
        if self.directory is None:
            return None
        same = [p for p in (self.directory, self.path) if p is not None and Path(p).resolve() == target.resolve()]
        return Path(self.directory) if same else None

    def _format_files(self) -> set[str]:
        """The top-level files of the bundle format this kind may write."""
        from hematoscope.bundle.ood import OOD_FILE

        return {"config.json", "metrics.json", "README.md", OOD_FILE, *self.weight_files}

    def _kept_files(self, target: Path) -> dict[str, Path]:
        """Files ``save(target)`` keeps without writing them (name -> where they are now): saving
        back home, the files of the bundle's directory that are not the format's own."""
        home = self._home(target)
        if home is None:
            return {}
        own = self._format_files()
        return {f.name: f for f in home.iterdir() if f.is_file() and f.name not in own}

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
            "abstain_threshold": self._cut(self.config.abstain_threshold),
            "ood": None if self.config.ood is None else self.config.ood.model_dump(mode="json"),
            "ood_accept": self.config.ood_accept,
            "views": self.view_mode,
            # the framing every crop is read at (``--framing``, or the one `--framing auto` chose for
            # a run), and what the search for flagged cells tries: a result's per-cell framing is
            # relative to the former
            "framing": self.preprocess.framing,
            "framing_search": None if self.config.reframe is None else {
                "zooms": list(self.config.reframe.zooms), "recolour": [list(c) for c in self.config.reframe.colours]},
            "answerable_classes": self.answerable_classes if self._answerable is not None else None,
            "view_trust_fitted": sorted(int(k) for k in self.config.view_trust),
            # the OOD threshold a cell answered from n views is flagged above, at the operating point
            "ood_limits": None if self.config.ood is None else {
                str(v): self.trust_for(v).ood_threshold
                for v in (sorted(int(k) for k in self.config.view_trust) or [self.trust_views])},
            "metrics": {k: v for k, v in self.metrics.items() if not isinstance(v, (dict, list))},
            # adapt keeps the trained model's test metrics: they are not the adapted model's
            "metrics_of": "the model before adaptation (its own test data)" if self.config.adaptation else "this model",
            "hematoscope_version": self.config.hematoscope_version,
            "adapted_to": (f"{a['source']} ({a['images']} images)" if (a := self.config.adaptation) else None),
            "path": str(self.path) if self.path else None,
        }


_BLAS = None


def image_sources(images: Iterable, names: Sequence[str] | None = None) -> list["ImageSource | SkippedFile"]:
    """Arrays, paths, encoded bytes (or ready :class:`~hematoscope.data.sources.ImageSource`
    items) as decode-loop items, named by ``names``, else by their path or ``image_<i>``.
    Arrays in another layout than RGB uint8 are converted (:func:`~hematoscope.data.images.rgb_array`).

    An array or PIL image that is not an image comes back as a skipped item with the reason.

    Raises:
        TypeError: one image instead of a list of them, or an item of an unknown type.
        ValueError: ``names`` of another length."""
    from hematoscope.data.images import pil_rgb_array, rgb_array
    from hematoscope.data.sources import ImageSource, SkippedFile

    require_image_list(images)
    items = list(images)
    if names is not None and len(names) != len(items):
        raise ValueError(f"{len(items)} images but {len(names)} source names")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (ImageSource, SkippedFile)):
            out.append(item)
            continue
        name = names[i] if names is not None else str(item) if isinstance(item, (str, Path)) else f"image_{i}"
        if isinstance(item, (str, Path)):
            out.append(ImageSource(name, Path(item)))
        elif isinstance(item, np.ndarray) or _is_pil(item):
            try:  # one unusable array is skipped with its reason, as an unreadable file is
                out.append(ImageSource(name, data=rgb_array(item) if isinstance(item, np.ndarray) else pil_rgb_array(item)))
            except ValueError as exc:
                out.append(SkippedFile(name, str(exc)))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            out.append(ImageSource(name, data=bytes(item)))
        elif hasattr(item, "read"):  # an open binary file
            out.append(ImageSource(name, data=item.read()))
        else:
            raise TypeError(f"image {i} is a {type(item).__name__}: expected a path, a numpy array, encoded "
                            "bytes, a binary file or a PIL image")
    return out


def require_image_list(images) -> None:
    """Refuse one image (or one folder's path) where a list of images is expected: it would be
    iterated as characters, bytes, pixel rows or lines, each taken as an image.

    Raises:
        TypeError: naming the fix.
    """
    if isinstance(images, (str, Path, bytes)) or (isinstance(images, np.ndarray) and images.ndim < 4) \
            or _is_pil(images) or hasattr(images, "read"):
        folder = isinstance(images, (str, Path)) and Path(images).is_dir()
        raise TypeError(f"images must be a list of images (paths, arrays, bytes or PIL images); got one "
                        f"{type(images).__name__}: " + ("a folder's images are "
                        "hematoscope.data.sources.expand_paths([folder])" if folder else "pass [image] for one image"))


def _is_pil(obj) -> bool:
    """Whether ``obj`` is a PIL image, without importing PIL for callers that pass none."""
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "mode") and hasattr(obj, "size")


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


def is_bundle_path(path: str | Path) -> bool:
    """Whether ``path`` holds a bundle: a directory with ``config.json``, or a ``.zip`` file."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix.lower() == ".zip")


def load_bundle(path: Path | str) -> Bundle:
    """Load a bundle directory or ``.zip`` of any kind; ``"default"`` (when no such path exists)
    is the model shipped with the package.

    Raises:
        BundleError: missing files, invalid config, unknown kind or unreadable format version,
            each with a message that says what to do.
    """
    if str(path) == DEFAULT_NAME and not Path(path).exists():
        from hematoscope.bundle.default import default_bundle_path

        path = default_bundle_path()
    path = Path(path)
    if not path.exists():
        raise BundleError(f"no bundle at {path}")
    if path.is_file() and path.suffix.lower() == ".zip":
        from hematoscope.data.archive import extract_zip_safely

        target = _zip_cache_dir(path)
        if _zipped_root(target) is None:
            with _io.atomic_dir(target) as d:
                extract_zip_safely(path, d)
        return _load_dir(_zipped_root(target) or target, origin=path)
    if not path.is_dir():
        raise BundleError(f"{path} is neither a bundle directory nor a .zip")
    return _load_dir(path, origin=path)


def _zipped_root(unpacked: Path) -> Path | None:
    """Where an unpacked zip's bundle files are: its top (``bundle.save("x.zip")``, or a zip made
    inside the folder), or the one folder it holds (``zip -r x.zip folder``); None if neither."""
    if (unpacked / "config.json").is_file():
        return unpacked
    entries = list(unpacked.iterdir()) if unpacked.is_dir() else []
    if len(entries) == 1 and (entries[0] / "config.json").is_file():
        return entries[0]
    return None


def _load_dir(directory: Path, origin: Path) -> Bundle:
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise BundleError(f"{origin} has no config.json: not a hematoscope bundle")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, or not text at all
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
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    except ValueError as exc:
        raise BundleError(f"{metrics_file} is not valid JSON ({exc})") from None
    try:
        bundle = bundle_class(config.kind)._load_weights(config, directory, metrics)
        bundle.path, bundle.directory = origin, directory
        if config.ood is not None:
            from hematoscope.bundle.ood import load_scorer

            bundle.ood = load_scorer(config.ood.model_dump(), directory)
    except BundleError:
        raise
    except ValueError as exc:  # a damaged or foreign file among the bundle's (it names the file)
        raise BundleError(f"cannot load bundle {origin}: {exc}") from None
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
