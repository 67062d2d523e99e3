"""Request and response bodies of the REST API (what /docs shows)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator


class ModelRef(BaseModel):
    """The bundle that produced an analysis."""

    name: str
    kind: str
    id: str = Field(description="fingerprint of the bundle's config.json")
    version: str
    ood_accept: float | None = Field(None, description="share of its validation cells the unlike-training flag "
                                     "accepted, when moved after fitting (serve --ood-accept, or the request's "
                                     "ood_accept); null = as fitted")


class ModelInfo(ModelRef):
    default: bool
    labels: list[str]
    input_size: int
    temperature: float
    abstain_threshold: float
    ood: dict[str, Any] | None
    ood_accept_levels: list[float] = Field(default_factory=list, description="the shares a request may move the "
                                           "flag to (POST /api/predict?ood_accept=); [] = it cannot be moved")
    metrics: dict[str, Any]
    metrics_of: str = Field("this model", description='"this model", or for an adapted one "the model before '
                            'adaptation (its own test data)": adapt does not measure accuracy (it has no labels)')
    explanation: str = Field(description='"grad-cam", "segmentation" or "none"')
    adapted_to: str | None = Field(None, description="the lab images this model was adapted to (hematoscope "
                                   "adapt): source name and image count; null = as trained")
    answerable_classes: list[str] | None = Field(None, description="the classes answers may name (hematoscope "
                                                 "serve --classes); null = all of labels")
    removable: bool = Field(False, description="adapted from the web app: DELETE /api/models/{name} removes it")
    adaptable: bool = Field(False, description="POST /api/models/adapt can adapt it to a new lab (a neural bundle)")
    framing: float = Field(1.0, description="the framing every crop is read at (a share of its side); an answer's "
                           "framing is relative to it")
    ood_limits: dict[str, float | None] | None = Field(
        None, description="per view count, the OOD score above which a cell is flagged, at the model's operating point")


class ModelList(BaseModel):
    data: list[ModelInfo]
    default: str
    can_adapt: bool = Field(False, description="POST /api/models/adapt is on (hematoscope serve --adapt-dir) and "
                            "a served model can be adapted")


class AdaptResult(BaseModel):
    """A model adapted to a lab's unlabelled crops from the web app, now served."""

    model: ModelInfo
    images: int = Field(description="readable crops it was adapted on")
    skipped: list[str] = Field(description="uploaded files that could not be read, with the reason")
    seconds: float
    framing: float = Field(description="the share of each crop's side the adapted model sees")
    accepted_before: float | None = Field(None, description="share of these crops the original model took as like "
                                          "its training data")
    accepted_after: float | None = Field(None, description="the same for held-out crops after adaptation")
    class_mix: dict[str, float] | None = Field(None, description="with tune: the crops' class mix estimated "
                                               "from them, which tuning held the mean answer to")


class Health(BaseModel):
    status: str
    version: str
    models: list[str]
    analyses: int | None = Field(description="analyses stored; null unless the caller may read the history")
    batching: dict[str, dict[str, Any]] | None = Field(
        default=None, description="per served model: model calls, images, requests, largest and mean batch, "
                                  "refused requests (only for a caller who may read the history)")


class TopClass(BaseModel):
    label: str
    prob: float


class Feature(BaseModel):
    """A named measurement and its SHAP contribution towards the explained class."""

    name: str
    value: float | None = None
    unit: str = ""
    contribution: float | None = None


class Explanation(BaseModel):
    """How the heatmap (if any) was made, or why there is none."""

    method: str = Field(description='"grad-cam", "segmentation" or "none"')
    target: str | None = Field(default=None, description="the class the heatmap explains")
    note: str | None = None
    features: list[Feature] = Field(default_factory=list)


class Correction(BaseModel):
    label: str
    note: str = ""
    updated: str


class ItemResult(BaseModel):
    """One uploaded image: its prediction, or the reason it could not be classified."""

    index: int
    source: str
    sha256: str
    error: str | None = None
    prediction: str | None = None
    confidence: float | None = None
    top_k: list[TopClass] = Field(default_factory=list)
    abstain: bool = False
    abstain_reason: str | None = None
    ood_score: float | None = None
    ood_flag: bool = False
    ood_limit: float | None = Field(default=None, description="the OOD score above which this cell is flagged: the "
                                    "threshold of its view count at the analysis's operating point (absent in "
                                    "analyses stored before it was recorded)")
    views: int | None = Field(default=None, description="test-time views the answer was computed from (the "
                              "adaptive cascade uses more for uncertain cells)")
    framing: float | None = Field(default=None, description="framing the answer was computed from, as a share "
                                  "of the side of the crop as the model frames it: 1 = as framed (the whole crop "
                                  "unless the model was adapted to another framing), below 1 a centre crop of that, "
                                  "above 1 padded into a larger frame (the framing search: the crop as framed looked "
                                  "unlike the training data)")
    recolour: str | None = Field(default=None, description="colour change the answer was computed from "
                                 "(e.g. 'saturation 1.5'; empty: the image's own colours), when the bundle's framing "
                                 "search tries colours")
    thumbnail: str | None = Field(default=None, description="JPEG data URL")
    heatmap: str | None = Field(default=None, description="PNG data URL of the explanation overlay")
    heatmap_full: bool = Field(default=False, description="the heatmap is also stored over the full-size image "
                               "(GET /api/analyses/{id}/items/{index}/heatmap)")
    explanation: Explanation | None = None
    correction: Correction | None = None


class DifferentialClass(BaseModel):
    label: str
    count: int
    percent: float


class Differential(BaseModel):
    """Counts and % per class of the classified (not abstained) cells."""

    classes: list[DifferentialClass]
    classified: int
    abstained: int
    abstain_reasons: dict[str, int]
    skipped: int
    total: int


class Analysis(BaseModel):
    id: str
    created: str
    sample: str = Field("", description="the lab's sample / slide id given with the upload (or set later)")
    model: ModelRef
    labels: list[str]
    n_images: int
    n_errors: int
    differential: Differential
    corrected_differential: Differential | None = Field(
        default=None, description="the count with the user's corrections applied (when there are any)")
    items: list[ItemResult]


class AnalysisSummary(BaseModel):
    id: str
    created: str
    sample: str = ""
    model: ModelRef
    n_images: int
    n_errors: int
    n_corrections: int
    differential: Differential
    corrected_differential: Differential | None = Field(
        default=None, description="the count with the user's corrections applied (when there are any)")


class AnalysisList(BaseModel):
    data: list[AnalysisSummary]
    count: int = Field(description="analyses stored in total")


class AnalysisPatch(BaseModel):
    sample: str = Field(max_length=1000, description="the lab's sample / slide id (\"\" clears it); at most "
                        "100 characters, no line breaks")


class CorrectionIn(BaseModel):
    index: int = Field(ge=0, description="position of the image in the analysis")
    label: str | None = Field(description="the correct class; null removes the correction")
    note: str = Field(default="", max_length=1000)


class CorrectionsIn(BaseModel):
    corrections: list[CorrectionIn] = Field(min_length=1, max_length=100_000)

    @field_validator("corrections")
    @classmethod
    def _one_per_image(cls, corrections: list[CorrectionIn]) -> list[CorrectionIn]:
        seen: set[int] = set()
        for c in corrections:
            if c.index in seen:  # two labels for one cell in one request: which did the user mean?
                raise ValueError(f"image {c.index} is corrected twice in one request")
            seen.add(c.index)
        return corrections
