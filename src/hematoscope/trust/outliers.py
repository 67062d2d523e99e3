"""Outlier screen of training data: rank the images of a dataset by how unlike blood-cell
crops they are, and flag those past a cut the user chooses.

A folder scraped together for training can hold images that are no cell at all: slide labels,
scanner test patterns, blank frames, photos with irrelevant backgrounds. The score is a model
bundle's out-of-distribution score (by default the shipped model's, see docs/trust.md): higher
means less like the cells it was trained on. It ranks every readable image; the *cut* decides
which are flagged:

- ``mad:K`` (default ``mad:4``): more than K robust standard deviations (1.4826 x the median
  absolute deviation) above this dataset's median score, both taken from the bulk of the scores
  (iterative clipping, so many outliers do not hide each other). It adapts to the dataset
  (another lab's stain shifts every score alike). Measured on PBC with the shipped model and
  one view (bench/outliers.py), real cells reach about 4 robust SDs at the 99.9th percentile.
- ``top:P``: the P % highest scores, e.g. ``top:1`` to review the worst 1 % by hand.
- ``bundle``: the bundle's own OOD threshold (fitted to keep ~95 % of its validation cells, so
  it flags ~5 % of ordinary cells too: a warning light for prediction, too eager for cleaning).
- a number: that score.

The screen reports; it never deletes. ``hematoscope data split --exclude-outliers REPORT``
leaves the flagged files out of a split.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle

DEFAULT_CUT = "mad:4"
#: Scale that makes the median absolute deviation estimate a normal standard deviation.
MAD_TO_SD = 1.4826


class OutlierError(ValueError):
    """The screen cannot run (a bundle without an OOD score, a malformed cut or report)."""


@dataclass(frozen=True)
class Cut:
    """Where to cut the ranking (see the module docstring); ``text`` is what the user wrote."""

    kind: str  # "mad" | "top" | "bundle" | "score"
    value: float | None
    text: str

    def threshold(self, scores: np.ndarray, bundle_threshold: float | None = None) -> float:
        """The score above which an image is flagged, for these ``scores`` (finite values).

        Raises:
            OutlierError: ``bundle`` cut for a bundle without an OOD threshold, or no scores.
        """
        if self.kind == "score":
            return float(self.value)
        if self.kind == "bundle":
            if bundle_threshold is None:
                raise OutlierError("cut 'bundle' needs a bundle with a fitted OOD threshold")
            return float(bundle_threshold)
        if len(scores) == 0:
            raise OutlierError("no image could be scored")
        if self.kind == "top":
            k = int(np.floor(len(scores) * self.value / 100))
            if k == 0:
                return float("inf")
            return float(np.sort(scores)[::-1][k - 1] - 1e-12)  # the k highest are above it
        center, spread = robust_center_spread(scores, self.value)
        return center + self.value * spread


def robust_center_spread(scores: np.ndarray, k: float, *, rounds: int = 10) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x MAD) of the bulk of ``scores``.

    Iterative clipping: the statistics are recomputed from the scores at most ``k`` spreads
    above the median until nothing changes, so a large share of far outliers (a folder that is
    10 % junk) does not widen the spread they are judged by.
    """
    kept = np.asarray(scores, dtype=np.float64)
    center = spread = float("nan")
    for _ in range(rounds):
        center = float(np.median(kept))
        spread = max(MAD_TO_SD * float(np.median(np.abs(kept - center))), 1e-12)
        inside = kept[kept <= center + k * spread]
        if len(inside) == len(kept) or len(inside) < 2:
            break
        kept = inside
    return center, spread


def parse_cut(text: str) -> Cut:
    """``"mad:8"``, ``"top:1"`` (percent), ``"bundle"`` or a number.

    Raises:
        OutlierError: anything else, with the accepted forms.
    """
    raw = str(text).strip().lower()
    forms = "mad:K (K robust SDs above the median), top:P (the P %% highest), bundle, or a score"
    if raw == "bundle":
        return Cut("bundle", None, raw)
    kind, sep, rest = raw.partition(":")
    try:
        if not sep:
            return Cut("score", float(raw), raw)
        value = float(rest)
    except ValueError:
        raise OutlierError(f"outlier cut {text!r} is not one of: {forms}") from None
    if kind == "mad" and value > 0:
        return Cut("mad", value, raw)
    if kind == "top" and 0 < value < 100:
        return Cut("top", value, raw)
    raise OutlierError(f"outlier cut {text!r} is not one of: {forms} (K > 0, 0 < P < 100)")


@dataclass
class OutlierReport:
    """Result of :func:`screen_outliers`: every scored image, worst first, and which are flagged."""

    method: str
    model: str
    views: int
    cut: str
    threshold: float
    n_scored: int
    #: Summary of the scores: median, bulk_median / bulk_sd (see :func:`robust_center_spread`), p99, max.
    scores_summary: dict[str, float]
    #: {path, label, score, flagged}, highest score first.
    ranked: list[dict[str, Any]]
    #: Images that could not be scored (unreadable), with the reason.
    unscored: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flagged(self) -> list[dict[str, Any]]:
        return [r for r in self.ranked if r["flagged"]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_flagged"] = len(self.flagged)
        d["flagged"] = [r["path"] for r in self.flagged]
        return d


def screen_outliers(
    table,
    bundle: "Bundle | None" = None,
    *,
    cut: str | Cut = DEFAULT_CUT,
    views: int | None = 1,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> OutlierReport:
    """Score every image of ``table`` (a samples table with ``path`` and ``label``) with the
    bundle's OOD score and flag those past ``cut``.

    Args:
        table: samples table (``read_dataset`` output) or a list of paths.
        bundle: a loaded bundle with an OOD scorer; None = the shipped default model.
        cut: where to cut (see :func:`parse_cut`).
        views: test-time views (1 = fastest; None = the bundle's own setting).
        batch_size: images per model call.
        workers: decoding threads (default: one per CPU).
        progress: show a progress bar / log lines.

    Raises:
        OutlierError: the bundle has no OOD scorer, or the cut is malformed.
    """
    import time

    from hematoscope.data.sources import ImageSource
    from hematoscope.progress import track

    start = time.perf_counter()
    cut = cut if isinstance(cut, Cut) else parse_cut(cut)
    if bundle is None:
        from hematoscope.bundle import load_bundle
        from hematoscope.bundle.default import default_bundle_path

        bundle = load_bundle(default_bundle_path())
    if bundle.ood is None or bundle.config.ood is None:
        raise OutlierError(f"bundle {bundle.name!r} has no out-of-distribution score; fit one with "
                           "`hematoscope trust fit`, or use the shipped default model")
    if views is not None and views != bundle.config.tta:
        bundle.set_tta(views)
    if isinstance(table, (list, tuple)):
        paths, labels = [str(p) for p in table], [""] * len(table)
    else:
        paths, labels = [str(p) for p in table["path"]], [str(x) for x in table["label"]]
    label_of = dict(zip(paths, labels))
    items = [ImageSource(p, Path(p)) for p in paths]
    score_of: dict[str, float] = {}
    unscored = []
    batches = bundle.iter_predictions(items, batch_size=batch_size, workers=workers)
    for pred in track(batches, total=-(-len(items) // batch_size), description="scoring images", enabled=progress):
        score_of.update(zip(pred.sources, pred.ood_score.tolist()))
        unscored.extend({"path": s.source, "reason": s.reason} for s in pred.skipped)
    scored = [p for p in paths if p in score_of and np.isfinite(score_of[p])]
    scores = np.array([score_of[p] for p in scored], dtype=np.float64)
    threshold = cut.threshold(scores, bundle.config.ood.threshold)
    order = np.argsort(-scores, kind="stable")
    ranked = [{"path": scored[i], "label": label_of[scored[i]], "score": round(float(scores[i]), 6),
               "flagged": bool(scores[i] > threshold)} for i in order]
    nan = float("nan")
    k = cut.value if cut.kind == "mad" else 4.0
    center, spread = robust_center_spread(scores, k) if len(scores) else (nan, nan)
    summary = {
        "median": float(np.median(scores)) if len(scores) else nan,
        "bulk_median": center,
        "bulk_sd": spread,
        "p99": float(np.quantile(scores, 0.99)) if len(scores) else nan,
        "max": float(scores.max()) if len(scores) else nan,
    }
    return OutlierReport(
        method=f"{bundle.config.ood.method} score of the bundle",
        model=bundle.name, views=int(bundle.config.tta), cut=cut.text, threshold=float(threshold),
        n_scored=len(scored), scores_summary={k: round(v, 6) for k, v in summary.items()}, ranked=ranked,
        unscored=unscored, seconds=round(time.perf_counter() - start, 2),
    )


def flagged_paths(report: Path | str | dict) -> list[str]:
    """The paths flagged in a ``hematoscope data check --outliers --json`` report.

    Raises:
        OutlierError: the file is unreadable or holds no outlier screen.
    """
    if not isinstance(report, dict):
        try:
            report = json.loads(Path(report).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OutlierError(f"cannot read outlier report {report}: {exc}") from None
    section = report.get("outliers") if isinstance(report, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("flagged"), list):
        raise OutlierError("the report holds no outlier screen: make it with "
                           "`hematoscope data check DATA --outliers --json REPORT`")
    return [str(p) for p in section["flagged"]]


def exclude(table, paths: Sequence[str]):
    """``table`` without the rows whose path is in ``paths`` (compared as resolved paths).

    Returns:
        (the kept rows, how many rows were dropped).
    """
    drop = {str(Path(p).resolve()) for p in paths} | {str(p) for p in paths}
    keep = ~table["path"].map(lambda p: str(p) in drop or str(Path(p).resolve()) in drop)
    return table[keep].reset_index(drop=True), int((~keep).sum())
