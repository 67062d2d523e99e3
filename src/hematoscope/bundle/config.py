"""The bundle's ``config.json`` schema: :class:`BundleConfig` and its typed sections.

Every section is a pydantic model. The kind-specific ones (``model``, ``ood``, ``training``) name
the fields this version reads and keep any others they are given (written by another version or
kind), and write back exactly the keys they were given: an old bundle's config round-trips
unchanged, so fingerprints of it (the server's model id, the few-shot feature cache) stay put.
``preprocess`` is the model's own input spec, :class:`~hematoscope.models.preprocess.Preprocess`.
The ``model`` section is chosen by ``kind`` (:data:`MODEL_SECTIONS`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Annotated, Any, Union

from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, SerializeAsAny, ValidationInfo,
                      field_validator, model_serializer)

from hematoscope.models.preprocess import TTA_VIEWS, Preprocess, Recolour

FORMAT_VERSION = 1
#: The name that stands for the package's shipped model wherever a bundle path is asked for.
DEFAULT_NAME = "default"
#: Older format versions this code can still read (upgraded in memory on load).
READABLE_FORMAT_VERSIONS = (1,)
INTENDED_USE = (
    "Research and decision support for classifying single peripheral-blood cell crops. "
    "Not a medical device: every result must be reviewed by a qualified person."
)

#: A number written as it was read (an int stays an int, so a re-written config hashes the same).
Number = Union[int, float]


def _as_preprocess(value: Any) -> Preprocess:
    return value if isinstance(value, Preprocess) else Preprocess.from_dict(dict(value))


PreprocessField = Annotated[Preprocess, PlainValidator(_as_preprocess), PlainSerializer(lambda p: p.to_dict())]


class Section(BaseModel):
    """A typed config section that keeps the keys it does not declare and writes back only the
    keys it was given (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _given_keys_only(self, handler):
        data = handler(self)
        given = self.model_fields_set | set(self.model_extra or {})
        return {k: v for k, v in data.items() if k in given}

    def clear(self, name: str) -> None:
        """Forget field ``name`` (back to its default, and no longer written)."""
        if name in type(self).model_fields:
            setattr(self, name, type(self).model_fields[name].get_default(call_default_factory=True))
            self.__pydantic_fields_set__.discard(name)
        elif self.model_extra is not None:
            self.model_extra.pop(name, None)


class ModelSection(Section):
    """``config.model`` of a kind that declares no fields of its own."""


class NeuralModel(ModelSection):
    """``config.model`` of a neural bundle."""

    #: timm architecture name.
    arch: str
    #: Width of the pooled features the network returns.
    num_features: int | None = None
    #: Where the backbone's starting weights came from (None: random).
    weights_source: str | None = None
    #: On-disk weight dtype.
    dtype: str = "float32"
    #: Normalisation layers the network is built with (see models.backbones.NORMS).
    norm: str = "batch"
    #: What ``hematoscope export`` wrote and how it compared with PyTorch (None: not exported).
    onnx: dict[str, Any] | None = None


class FewShotModel(ModelSection):
    """``config.model`` of a few-shot bundle."""

    #: The frozen feature extractor (``type`` "timm" or "bundle" and its description).
    backbone: dict[str, Any]
    #: Flip/rot90 views averaged per image. Bundles written before the count was an int have
    #: only the switch ``tta`` (True = 8 views); see :attr:`view_count`.
    views: int | None = None
    tta: bool | None = None
    #: The head's recipe (name, transform, pca ...).
    head: dict[str, Any] = Field(default_factory=dict)
    feature_dim: int | None = None
    extractor_identity: str | None = None

    @property
    def view_count(self) -> int:
        return int(self.views) if self.views is not None else 8 if self.tta else 1


class ClassicalModel(ModelSection):
    """``config.model`` of a classical bundle."""

    type: str = "xgboost"
    #: Version of the named feature set and the feature names in column order.
    feature_version: str | None = None
    feature_names: list[str] = Field(default_factory=list)


#: The ``model`` section of each built-in kind.
MODEL_SECTIONS: dict[str, type[ModelSection]] = {"neural": NeuralModel, "fewshot": FewShotModel,
                                                 "classical": ClassicalModel}


class OODConfig(Section):
    """``config.ood``: the fitted out-of-distribution scorer. Its own parameters (k, centres and
    scales ...) are kept as further keys and handed to the scorer on load."""

    #: Registered scorer name (:func:`hematoscope.bundle.ood.list_scorers`).
    method: str
    #: Flag an image when its score is above this (None: scores only).
    threshold: Number | None = None
    #: Share of in-distribution validation images the threshold accepts.
    target_tpr: Number | None = None
    #: Thresholds accepting each share of the validation images the threshold was chosen on
    #: (:func:`hematoscope.bundle.ood.accept_levels`; absent in bundles fitted before them).
    accept_levels: dict[str, float] | None = None


class TrainingRecord(Section):
    """``config.training``: how the bundle was made. Learners record what they need (the
    training run's config, split fingerprint, seeds, times ...) as further keys."""

    #: Which learner and recipe made the bundle.
    recipe: str | None = None
    #: Training images per label: the class mix the model learnt, from which ``adapt --tune``
    #: estimates a lab's own (empty: not recorded).
    train_class_counts: dict[str, int] = Field(default_factory=dict)


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
    #: OOD thresholds accepting each share of this view count's validation cells
    #: (:func:`hematoscope.bundle.ood.accept_levels`; empty: not stored).
    ood_accept_levels: dict[str, float] = Field(default_factory=dict)
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


#: Largest padding the size estimate of :class:`ReframeRule` tries (a cell 2.5x tighter than PBC's).
SIZE_PAD_MAX = 2.5
#: A frame more stained than this is no cell crop (PBC cells cut to their centre 40 %: at most
#: 0.72; generated text on a dark ground: 0.9 and more) and is not padded.
SIZE_SHARE_MAX = 0.85


#: The colour changes ``predict --recolour`` adds to the framing search (:class:`ReframeRule`
#: ``colours``), chosen on LISC's own-lab half (docs/crosslab.md).
DEFAULT_RECOLOURS = (("saturation", 1.5), ("saturation", 2.0), ("gamma", 1.4))


class ReframeRule(BaseModel):
    """Framing search: a cell flagged as unlike the training data on its whole crop is run again
    on other framings of it (``Preprocess.framing`` shares: below 1 centre crops, above 1 the
    crop padded into a larger frame) and answered from the one whose features look most like the
    training data. Centre crops compete with the whole crop on the lowest OOD score; a padded
    framing is tried only for a cell still flagged after that, and kept only when it brings the
    score ``out_margin`` under the threshold (one cell's score is too noisy to move a cell from
    another lab's loose framing into a tight one on a small difference).

    Other labs frame cells differently (a small lymphocyte in a frame full of red cells, a crop
    cut close around the cell); the search finds the framing the model knows without a
    segmentation. Cells like the training data are not touched, so it costs time only on
    flagged cells. Measured in docs/crosslab.md."""

    model_config = ConfigDict(extra="forbid")

    zooms: list[float] = Field(min_length=1)
    #: OOD-score units under the threshold a padded framing must reach to be kept.
    out_margin: float = Field(default=2.0, ge=0)
    #: Median stained-nucleus share of the training crops (``Preprocess.stained_share``), or None.
    #: When set, a flagged cell whose share says its crop is framed ``size_gate`` times tighter
    #: (``sqrt(share / size_ref)``) or more also tries its crop padded by that factor (at most
    #: :data:`SIZE_PAD_MAX`; not a frame stained beyond :data:`SIZE_SHARE_MAX`), competing with
    #: the other framings on the lowest OOD score: the cell's own size, not its noisy score, says
    #: which way to look.
    size_ref: float | None = Field(default=None, gt=0, le=1)
    size_gate: float = Field(default=1.6, gt=1, le=SIZE_PAD_MAX)
    #: Colour changes (``recolour_image``: ``["saturation", 1.5]``, ``["gamma", 1.4]``) a cell
    #: still flagged after the framings tries at every framing it tried (whole crop, centre crops,
    #: its size's padded frame), competing on the lowest OOD score: stain and camera differences
    #: that the per-channel colour canonicalisation leaves (saturation, gamma), the way the
    #: framings undo framing differences.
    colours: list[tuple[Recolour, float]] = Field(default_factory=list)

    @field_validator("zooms")
    @classmethod
    def _framings(cls, value: list[float]) -> list[float]:
        if any(not 0.3 <= z <= 3 or z == 1 for z in value) or len(set(value)) != len(value):
            raise ValueError(f"zooms must be distinct shares of the side in [0.3, 3], not 1; got {value}")
        return value

    @field_validator("colours")
    @classmethod
    def _colours(cls, value: list[tuple[str, float]]) -> list[tuple[str, float]]:
        if any(not 0.25 <= f <= 4 or f == 1 for _, f in value) or len(set(value)) != len(value):
            raise ValueError(f"colour changes must be distinct factors in [0.25, 4], not 1; got {value}")
        return value

    def with_colours(self, colours: Sequence[tuple[str, float]] = DEFAULT_RECOLOURS) -> "ReframeRule":
        """This rule with ``colours`` as its colour changes (validated; ``[]``: none)."""
        return ReframeRule(**{**self.model_dump(), "colours": list(colours)})


#: Hex digits of a file's sha256 kept per image in ``BundleConfig.seen_images`` (64 bits: no two
#: of a lab's images share them by chance).
SEEN_DIGITS = 16


def seen_fingerprints(digests: Iterable[str | None]) -> list[str]:
    """``BundleConfig.seen_images`` entries of files' sha256 digests (None: unreadable, left out)."""
    return sorted({d[:SEEN_DIGITS] for d in digests if d})


class BundleConfig(BaseModel):
    """Everything needed to rebuild a model and use it, written by the code that trained it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    format_version: int = FORMAT_VERSION
    kind: str
    name: str = "unnamed"
    hematoscope_version: str = ""
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    labels: list[str] = Field(min_length=2, description="canonical class names in output index order")
    taxonomy_version: str = ""
    #: The model's input spec (a :class:`~hematoscope.models.preprocess.Preprocess`, validated
    #: by it; written as its ``to_dict()``).
    preprocess: PreprocessField
    #: Kind-specific model description: :class:`NeuralModel`, :class:`FewShotModel`,
    #: :class:`ClassicalModel`, or a plain :class:`ModelSection` for other kinds.
    model: SerializeAsAny[ModelSection] = Field(default_factory=ModelSection)
    #: Softmax temperature fitted on validation data (1.0 = uncalibrated).
    temperature: float = Field(default=1.0, gt=0)
    #: Abstain when the calibrated top-1 probability is below this value.
    abstain_threshold: float = Field(default=0.0, ge=0, le=1)
    #: Flip/rot90 views averaged per image (1, 2, 4 or 8): more views cost proportionally more
    #: time and give fewer confident mistakes and better unknown-cell flags. Temperature, OOD
    #: and abstain thresholds are fitted with the value set here.
    tta: int = 1
    #: Out-of-distribution scorer (method, threshold and the scorer's own parameters); None = not fitted.
    ood: OODConfig | None = None
    #: Trust fitted per view count ({"1": ViewTrust, "8": ...}, by `hematoscope trust fit`); the
    #: top-level temperature / abstain_threshold / ood threshold equal the entry for ``tta``.
    #: Empty (bundles fitted before per-view trust): the top-level settings serve every view count.
    view_trust: dict[str, ViewTrust] = Field(default_factory=dict)
    #: Fingerprint of the top-level trust settings ``view_trust`` was fitted with: when something
    #: refits them alone (e.g. ``adapt``), the per-view entries are stale and not used.
    view_trust_of: str | None = None
    #: Adaptive views, the default way to predict when set (``--tta N`` forces N fixed views).
    cascade: CascadeRule | None = None
    #: Framing search for cells flagged as unlike the training data; None = whole crops only.
    reframe: ReframeRule | None = None
    #: Operating point of the OOD flag chosen after fitting: the share of the validation cells
    #: it accepts, one of ``OOD_ACCEPT_LEVELS`` (:meth:`Bundle.set_ood_accept`); None = as fitted.
    ood_accept: float | None = None
    #: Set by :func:`hematoscope.bundle.adapt.adapt_bundle`: the lab's images it was adapted on
    #: (name, count, content hash) and what changed; None = as trained.
    adaptation: dict[str, Any] | None = None
    #: How it was trained: recipe, data sources and fingerprint, split, seed, time.
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    #: The images it learnt from beyond its training split (a few-shot head's labelled and
    #: unlabelled images, a lab's adaptation crops), each as the first :data:`SEEN_DIGITS` hex
    #: digits of the file's sha256, sorted: scoring them would not be a test, so ``evaluate``
    #: counts them. Empty: none recorded (a trained network's split is in its run's split.csv).
    seen_images: list[str] = Field(default_factory=list)
    intended_use: str = INTENDED_USE
    data_sources: list[str] = Field(default_factory=list)
    changelog: dict[str, str] = Field(default_factory=dict)

    @field_validator("tta")
    @classmethod
    def _known_view_count(cls, value: int) -> int:
        if value not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {TTA_VIEWS}; got {value}")
        return value

    @field_validator("ood_accept")
    @classmethod
    def _known_accept_level(cls, value: float | None) -> float | None:
        from hematoscope.bundle.ood import OOD_ACCEPT_LEVELS

        if value is not None and value not in OOD_ACCEPT_LEVELS:
            raise ValueError(f"ood_accept must be one of {OOD_ACCEPT_LEVELS}; got {value}")
        return value

    @field_validator("view_trust")
    @classmethod
    def _known_view_keys(cls, value: dict) -> dict:
        bad = sorted(k for k in value if k not in {str(v) for v in TTA_VIEWS})
        if bad:
            raise ValueError(f"view_trust keys must be view counts {TTA_VIEWS}; got {bad}")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _kind_model_section(cls, value: Any, info: ValidationInfo) -> Any:
        """``model`` validated by the section of ``kind`` (unknown kinds keep a plain section)."""
        if isinstance(value, dict):
            return MODEL_SECTIONS.get(info.data.get("kind"), ModelSection).model_validate(value)
        return value

    def trust_fingerprint(self) -> str:
        """Hash of the top-level trust settings (temperature, abstain threshold, OOD config)."""
        ood = None if self.ood is None else self.ood.model_dump(mode="json")
        text = json.dumps([self.temperature, self.abstain_threshold, ood], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
