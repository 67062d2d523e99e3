"""Per-image prediction results and the differential count, rendered the same way everywhere
(rich table, CSV, JSON, REST API, web page)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hematoscope.data.sources import SkippedFile  # part of every Prediction

#: Abstention reasons, in the words shown to a lab user.
LOW_CONFIDENCE = "low confidence"
UNLIKE_TRAINING = "unlike training data"


@dataclass
class Explanation:
    """Why a bundle answered ``target`` for one image, by ``method`` (see
    :meth:`~hematoscope.bundle.Bundle.explainer`): ``png`` a picture to show (a heatmap or
    outlines drawn on the image) or None, ``features`` named-feature contributions or None,
    ``heatmap`` the map ``png`` draws (float (H, W) in [0, 1] over the explained image's pixels) or
    None, and ``regions`` the integer region labels whose borders ``png`` draws (segmentation) or
    None, so either can be drawn again over a larger copy of the image
    (:func:`hematoscope.explain.overlay.draw_explanation`)."""

    method: str
    target: str
    note: str
    png: bytes | None = None
    features: list[dict] | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)
    regions: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {"method": self.method, "target": self.target, "note": self.note}
        if self.features is not None:
            out["features"] = self.features
        return out


@dataclass
class Prediction:
    """Results for N images over C classes.

    ``probs`` are calibrated (temperature-scaled) probabilities whose columns follow ``labels``.
    An abstained image keeps its probabilities but is counted apart, never silently as a class.
    """

    labels: list[str]
    probs: np.ndarray  # (N, C) float
    sources: list[str]
    ood_score: np.ndarray  # (N,) higher = less like the training data; NaN when not scored
    ood_flag: np.ndarray  # (N,) bool
    abstain: np.ndarray  # (N,) bool
    abstain_reason: list[str | None]
    skipped: list[SkippedFile] = field(default_factory=list)
    #: (N,) test-time views each answer was computed from (the cascade mixes 1 and 8); None
    #: when not recorded.
    views: np.ndarray | None = None
    #: (N,) framing each answer was computed from, as a share of the side of the image as the
    #: bundle frames it (``Preprocess.framing``; 1 = as framed, the whole crop unless the bundle
    #: sets another; below 1 a centre crop of that, above 1 padded into a larger frame, when the
    #: bundle's framing search, :class:`~hematoscope.bundle.config.ReframeRule`, chose one);
    #: None when the bundle has no framing search.
    framing: np.ndarray | None = None
    #: (N,) colour change each answer was computed from (``"saturation 1.5"``; ``""`` for the
    #: image's own colours), when the framing search tries colours (``ReframeRule.colours``);
    #: else None.
    recolour: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def predicted(self) -> list[str]:
        return [self.labels[i] for i in self.probs.argmax(1)] if len(self) else []

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1) if len(self) else np.zeros(0)

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """The ``k`` likeliest classes of each image, best first, leaving out classes of
        probability 0 after the first (those an answer restricted to other classes cannot name)."""
        k = max(1, min(k, len(self.labels)))
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(self.probs[i, j])) for r, j in enumerate(row) if r == 0 or self.probs[i, j] > 0]
                for i, row in enumerate(order)]

    def records(self, k: int = 3) -> list[dict]:
        """One flat dict per image (and one per skipped file), for CSV / JSON / the API."""
        rows = []
        for i, top in enumerate(self.top_k(k)):
            row = {
                "source": self.sources[i],
                "prediction": top[0][0],
                "confidence": round(top[0][1], 6),
                "abstain": bool(self.abstain[i]),
                "abstain_reason": self.abstain_reason[i] or "",
                "ood_score": None if np.isnan(self.ood_score[i]) else round(float(self.ood_score[i]), 6),
                "ood_flag": bool(self.ood_flag[i]),
            }
            # the same keys whatever ran (a JSON report's rows then share one schema): without a
            # framing search every answer came from the run's own framing, with no colour change
            row["views"] = None if self.views is None else int(self.views[i])
            row["framing"] = 1.0 if self.framing is None else round(float(self.framing[i]), 3)
            row["recolour"] = "" if self.recolour is None else str(self.recolour[i])
            for r, (lab, p) in enumerate(top, 1):
                row[f"top{r}"] = lab
                row[f"top{r}_prob"] = round(p, 6)
            rows.append(row)
        for s in self.skipped:
            rows.append({"source": s.source, "prediction": "", "error": s.reason})
        return rows

    def differential(self) -> "DifferentialCount":
        return DifferentialCount.from_prediction(self)

    def share_with_views(self, views: int) -> float | None:
        """Share of the images answered from ``views`` test-time views (with the cascade's slow
        view count: the share that took the slow path); None when views were not recorded."""
        if self.views is None or len(self) == 0:
            return None
        return float(np.mean(self.views == views))

    def take(self, index: np.ndarray) -> "Prediction":
        """The images at ``index`` (an int array), in that order (``skipped`` is not carried)."""
        index = np.asarray(index, dtype=np.int64)
        return Prediction(self.labels, self.probs[index], [self.sources[i] for i in index], self.ood_score[index],
                          self.ood_flag[index], self.abstain[index], [self.abstain_reason[i] for i in index],
                          [], None if self.views is None else self.views[index],
                          None if self.framing is None else self.framing[index],
                          None if self.recolour is None else self.recolour[index])

    def replace(self, index: np.ndarray, other: "Prediction") -> None:
        """Overwrite the images at ``index`` with ``other``'s answers for them (same order)."""
        self.probs = self.probs.copy()
        for name in ("probs", "ood_score", "ood_flag", "abstain", "views", "framing", "recolour"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None:
                mine[index] = theirs
        for j, i in enumerate(index):
            self.abstain_reason[i] = other.abstain_reason[j]

    @classmethod
    def empty(cls, labels: Sequence[str]) -> "Prediction":
        return cls(list(labels), np.zeros((0, len(labels))), [], np.zeros(0), np.zeros(0, bool),
                   np.zeros(0, bool), [], [])

    @classmethod
    def concat(cls, parts: Sequence["Prediction"], labels: Sequence[str] | None = None) -> "Prediction":
        if not parts:
            if labels is None:
                raise ValueError("concat of no predictions needs labels")
            return cls.empty(labels)
        labels = parts[0].labels
        return cls(
            labels=labels,
            probs=np.concatenate([p.probs for p in parts]) if parts else np.zeros((0, len(labels))),
            sources=[s for p in parts for s in p.sources],
            ood_score=np.concatenate([p.ood_score for p in parts]),
            ood_flag=np.concatenate([p.ood_flag for p in parts]),
            abstain=np.concatenate([p.abstain for p in parts]),
            abstain_reason=[r for p in parts for r in p.abstain_reason],
            skipped=[s for p in parts for s in p.skipped],
            views=_concat_optional([p.views for p in parts], parts),
            framing=_concat_optional([p.framing for p in parts], parts),
            recolour=_concat_optional([p.recolour for p in parts], parts),
        )


def _concat_optional(arrays: list[np.ndarray | None], parts: Sequence[Prediction]) -> np.ndarray | None:
    """A per-image column over ``parts``: None unless every non-empty part recorded it."""
    if all(a is not None or len(p) == 0 for a, p in zip(arrays, parts)) and any(a is not None for a in arrays):
        return np.concatenate([a for a in arrays if a is not None])
    return None


@dataclass
class DifferentialCount:
    """Counts and percentages per class, like an analyser's report. Percentages are of the
    classified (not abstained) cells; abstentions and unreadable files are reported apart."""

    labels: list[str]
    counts: dict[str, int]
    abstained: int
    abstain_reasons: dict[str, int]
    skipped: int

    @property
    def classified(self) -> int:
        return sum(self.counts.values())

    @property
    def total(self) -> int:
        return self.classified + self.abstained + self.skipped

    def percent(self) -> dict[str, float]:
        n = self.classified
        return {k: (100.0 * v / n if n else 0.0) for k, v in self.counts.items()}

    def to_dict(self) -> dict:
        pct = self.percent()
        return {
            "classes": [{"label": k, "count": self.counts[k], "percent": round(pct[k], 2)} for k in self.labels],
            "classified": self.classified,
            "abstained": self.abstained,
            "abstain_reasons": self.abstain_reasons,
            "skipped": self.skipped,
            "total": self.total,
        }

    @classmethod
    def from_prediction(cls, pred: Prediction) -> "DifferentialCount":
        counts = {lab: 0 for lab in pred.labels}
        reasons: dict[str, int] = {}
        for lab, ab, why in zip(pred.predicted, pred.abstain, pred.abstain_reason):
            if ab:
                reasons[why or "abstained"] = reasons.get(why or "abstained", 0) + 1
            else:
                counts[lab] += 1
        return cls(list(pred.labels), counts, int(np.sum(pred.abstain)), reasons, len(pred.skipped))
