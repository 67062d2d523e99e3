"""Trust per number of test-time views, and the adaptive-view cascade, fitted from one pass.

Averaging flip/rot90 views changes a model's logits and features, so a temperature or OOD
threshold fitted for 8 views does not fit 1 view (on PBC the 8-view settings made 1 view abstain
on one cell in seven). :func:`fit_view_trust` fits temperature, OOD threshold and abstain
threshold for every view count from the outputs of *every view of every image*, computed once
(:class:`ViewOutputs`): the outputs for n views are the mean of the first n (identity first),
exactly what :meth:`hematoscope.bundle.neural.NeuralBundle.forward_tensor` computes, so the
model never runs twice for the same image.

The cascade (:func:`fit_cascade`) answers every cell from 1 view and runs more views (the slow
path: 2, 4 or 8) only for cells whose 1-view answer is uncertain: calibrated confidence below a
cut, or OOD score above a cut (and below a reject level where no validation cell was ever accepted
by the slow path). The slow path and the cuts are the cheapest (fewest extra views per cell) that
keep the cascade's validation accuracy, accuracy on answered cells and abstain rate within small
tolerances of 8 views.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hematoscope.bundle.base import ViewOutputs, cascade_gate
from hematoscope.models.preprocess import TTA_VIEWS

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle, CascadeRule
    from hematoscope.bundle.prediction import Prediction


def max_views(bundle: "Bundle") -> int:
    """Most test-time views ``bundle`` can average (:attr:`~hematoscope.bundle.Bundle.max_views`)."""
    return bundle.max_views


def view_outputs(bundle: "Bundle", images: Sequence[np.ndarray], views: int | None = None) -> ViewOutputs:
    """Every view's raw outputs for decoded images: ``views`` (default: all the bundle can
    average); see :meth:`~hematoscope.bundle.Bundle.forward_views`."""
    return bundle.forward_views(images, bundle.max_views if views is None else views)


# --- fitting ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CascadeTolerance:
    """How far the cascade may fall short of its slow path on validation data (fractions):
    accuracy on all cells, accuracy on answered cells, and the share of cells answered."""

    accuracy: float = 0.001
    accuracy_answered: float = 0.001
    abstained: float = 0.005


def _abstain_value(abstain_min_confidence: float | None, abstain_cost: float) -> float:
    return float(abstain_min_confidence) if abstain_min_confidence is not None else 1.0 - abstain_cost


def fit_view_trust(
    bundle: "Bundle",
    *,
    train: tuple[ViewOutputs, np.ndarray],
    val: tuple[ViewOutputs, np.ndarray],
    views: Sequence[int] | None = None,
    default_views: int | None = None,
    cascade: bool = True,
    target_tpr: float = 0.95,
    target_answered: float | None = 0.95,
    method: str | None = None,
    abstain_min_confidence: float | None = None,
    abstain_cost: float = 0.25,
    tolerance: CascadeTolerance = CascadeTolerance(),
) -> dict[str, Any]:
    """Fit trust for every view count in ``views`` and the cascade, in place.

    1. The OOD scorer's arrays are fitted once, on the training outputs of the most views (the
       steadiest features) with :func:`hematoscope.trust.fit.fit_trust`.
    2. For each view count n: temperature on the n-view validation logits; the scorer's
       view-dependent parameters (:meth:`~hematoscope.trust.OODScorer.view_params`) on the same
       training images' n-view outputs; abstain threshold by Chow's rule (or
       ``abstain_min_confidence``); OOD threshold: the lowest that answers ``target_answered`` of
       the n-view validation images together with the abstain rule (:func:`ood_threshold_for`),
       and never below the ``target_tpr`` quantile of their scores. So every view count answers
       the same share of in-distribution cells, though fewer views are less confident.
    3. ``config.tta = default_views``, whose entry also fills the bundle-wide settings (what
       older readers and the model card show).
    4. When ``cascade`` and the kind has views: :func:`fit_cascade` from 1 view to a slow path of
       2, 4 or 8 views (the cheapest that keeps the most views' validation answers within
       ``tolerance``); it becomes the bundle's default way to predict.

    Args:
        bundle: any bundle kind (kinds without views get the 1-view entry only).
        train, val: (:class:`ViewOutputs`, labels as indices or names) of training and
            validation images (disjoint).
        views: view counts to fit (default: 1, 2, 4, 8 up to what was computed).
        default_views: fixed view count when the cascade is not used (default: the bundle's
            ``tta`` when fitted here, else the most).
        cascade: also fit the cascade (and make it the default).
        target_tpr: the OOD flag accepts at least this share of validation images.
        target_answered: share of validation images to answer (OOD flag and abstain rule
            together); None = the OOD threshold is the ``target_tpr`` quantile.
        method, abstain_min_confidence, abstain_cost: as for ``fit_trust``.
        tolerance: what the cascade may lose against its slow path on validation data.

    Returns:
        A JSON-able report: ``views`` ({n: validation numbers}), ``default_views``, ``cascade``
        (the rule and its validation numbers, or None) and the ``fit_trust`` report of step 1.

    Raises:
        ValueError: bad arguments, or too few views computed for ``views``.
    """
    from hematoscope.bundle.base import ViewTrust
    from hematoscope.bundle.ood import accept_levels
    from hematoscope.trust.calibration import expected_calibration_error, fit_temperature, softmax
    from hematoscope.trust.fit import class_indices, fit_trust

    (train_vo, train_y), (val_vo, val_y) = train, val
    train_y, val_y = class_indices(bundle, train_y), class_indices(bundle, val_y)
    computed = min(train_vo.views, val_vo.views)
    views = sorted(set(views or [v for v in TTA_VIEWS if v <= computed]))
    bad = [v for v in views if v not in TTA_VIEWS or v > computed or (v > 1 and not bundle.supports_tta)]
    if bad or not views:
        raise ValueError(f"cannot fit trust for {bad or views} views: {computed} computed, "
                         f"{bundle.kind} bundles average {'up to 8' if bundle.supports_tta else 'no'} views")
    if default_views is None:
        default_views = bundle.config.tta if bundle.config.tta in views else max(views)
    if default_views not in views:
        raise ValueError(f"default_views {default_views} is not among the fitted view counts {views}")

    bank_views = max(views)
    base = fit_trust(bundle, train=(train_vo.averaged(bank_views), train_y),
                     val=(val_vo.averaged(bank_views), val_y), target_tpr=target_tpr, method=method,
                     abstain_min_confidence=abstain_min_confidence, abstain_cost=abstain_cost)
    scorer = bundle.ood
    abstain = _abstain_value(abstain_min_confidence, abstain_cost)
    entries: dict[str, ViewTrust] = {}
    for v in views:
        tr, va = train_vo.averaged(v), val_vo.averaged(v)
        temperature = fit_temperature(va.logits, val_y)
        probs = softmax(va.logits, temperature)
        params, threshold, levels, flagged = {}, None, {}, np.zeros(len(val_y), bool)
        if scorer is not None:
            params = scorer.view_params(tr.features, train_y, tr.logits, temperature=temperature)
            mode_scorer = copy.copy(scorer)
            mode_scorer.set_params(params)
            scores = np.asarray(mode_scorer.score(features=va.features, logits=va.logits), dtype=np.float64)
            threshold = ood_threshold_for(scores, probs.max(1) >= abstain, target_tpr=target_tpr,
                                          target_answered=target_answered)
            levels = accept_levels(scores)
            flagged = scores > threshold
        low = probs.max(1) < abstain
        answered = ~(flagged | low)
        correct = probs.argmax(1) == val_y
        entries[str(v)] = ViewTrust(
            temperature=temperature, abstain_threshold=abstain, ood_threshold=threshold,
            ood_params={k: float(x) for k, x in params.items()}, ood_accept_levels=levels,
            val={"n": int(len(val_y)), "accuracy": float(correct.mean()),
                 "answered": float(answered.mean()), "ood_accepted": float(1 - flagged.mean()),
                 "low_confidence": float(low.mean()),
                 "accuracy_answered": float(correct[answered].mean()) if answered.any() else None,
                 "ece_before": expected_calibration_error(softmax(va.logits), val_y),
                 "ece_after": expected_calibration_error(probs, val_y)})

    cfg = bundle.config
    chosen = entries[str(default_views)]
    cfg.tta = default_views
    cfg.temperature, cfg.abstain_threshold = chosen.temperature, chosen.abstain_threshold
    if scorer is not None:
        scorer.set_params(chosen.ood_params)
        scorer.threshold = chosen.ood_threshold
        scorer.accept_levels = dict(chosen.ood_accept_levels)
        cfg.ood = scorer.config()
    cfg.view_trust = entries
    cfg.view_trust_of = cfg.trust_fingerprint()
    cfg.cascade = None
    bundle._forced_views, bundle._mode_scorers, bundle._warned = None, {}, set()
    bundle.trust_views = default_views
    bundle.metrics.setdefault("calibration", {}).update(
        {"temperature": chosen.temperature, "views": default_views, "ece_before": chosen.val["ece_before"],
         "ece_after": chosen.val["ece_after"]})
    bundle.metrics.setdefault("trust", {}).update(
        {"views": default_views, "ood_threshold": chosen.ood_threshold, "val_coverage": chosen.val["answered"],
         "val_accuracy": chosen.val["accuracy"], "val_accuracy_accepted": chosen.val["accuracy_answered"],
         "val_ood_accept_rate": chosen.val["ood_accepted"]})
    bundle.metrics["view_trust"] = {k: e.val for k, e in entries.items()}
    from hematoscope.trust.fit import mirror_calibration  # fit.py imports this module

    mirror_calibration(bundle.metrics)
    report: dict[str, Any] = {"views": {k: e.val for k, e in entries.items()}, "default_views": default_views,
                              "bank_views": bank_views, "cascade": None, "base": base}

    if cascade and bundle.supports_tta and 1 in views and bank_views > 1:
        sources = [str(i) for i in range(len(val_y))]
        fast = bundle.decide(val_vo.averaged(1), sources, views=1)
        slows = {v: bundle.decide(val_vo.averaged(v), sources, views=v) for v in views if v > 1}
        rule = fit_cascade(fast, slows, val_y, fast_views=1, fast_abstain=entries["1"].abstain_threshold,
                           fast_ood=entries["1"].ood_threshold, tolerance=tolerance)
        cfg.cascade = rule
        bundle.metrics["cascade"] = dict(rule.val)
        report["cascade"] = rule.model_dump(mode="json")
    return report


#: The OOD threshold never accepts more than this share of validation images, whatever
#: ``target_answered`` asks (the flag must still catch the worst in-distribution outliers).
MAX_OOD_ACCEPT = 0.99


def ood_threshold_for(scores: np.ndarray, confident: np.ndarray, *, target_tpr: float,
                      target_answered: float | None) -> float:
    """OOD threshold on validation ``scores`` (higher = less like training data) so that
    ``target_answered`` of the images are answered, i.e. confident (``confident``) and not
    flagged; at least the ``target_tpr`` quantile of all scores, at most their
    :data:`MAX_OOD_ACCEPT` quantile. With ``target_answered`` None: the ``target_tpr`` quantile."""
    scores = np.asarray(scores, dtype=np.float64)
    floor = float(np.quantile(scores, target_tpr))
    if target_answered is None:
        return floor
    confident = np.asarray(confident, bool)
    share = float(confident.mean())
    if share == 0:
        return floor
    need = min(1.0, target_answered / share)  # share of the confident images to accept
    wanted = float(np.quantile(scores[confident], need))
    return float(min(max(floor, wanted), np.quantile(scores, MAX_OOD_ACCEPT)))


def cascade_decisions(fast: "Prediction", slow: "Prediction", *, min_confidence: float,
                      max_ood: float | None, reject_ood: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a cascade rule sends each cell, given both paths' answers for every cell.

    Returns:
        (slow path taken (N,) bool, predicted class (N,), abstained (N,) bool).
    """
    conf, score = fast.confidence, np.asarray(fast.ood_score, dtype=np.float64)
    take_slow = cascade_gate(conf, score, min_confidence=min_confidence, max_ood=max_ood, reject_ood=reject_ood)
    pred = np.where(take_slow, slow.probs.argmax(1), fast.probs.argmax(1))
    abstained = np.where(take_slow, slow.abstain, fast.abstain)
    return take_slow, pred, abstained


def fit_cascade(fast: "Prediction", slow: "Prediction | dict[int, Prediction]", y: np.ndarray, *,
                fast_views: int = 1, slow_views: int = 8, fast_abstain: float, fast_ood: float | None,
                reference: "Prediction | None" = None, tolerance: CascadeTolerance = CascadeTolerance(),
                grid: int = 41) -> "CascadeRule":
    """The cheapest cascade rule whose validation answers stay within ``tolerance`` of the
    reference (the most views).

    Candidates: a slow path (when ``slow`` maps several view counts to their decisions, each of
    them), confidence cuts from the fast abstain threshold up to "every cell" (quantiles of the fast
    confidences above it) and OOD cuts up to the fast OOD threshold (quantiles of the fast scores
    below it). Fast cells above both cuts are therefore always answered by the fast path.
    ``reject_ood`` is the highest fast OOD score of a validation cell that the slow path accepted
    as like the training data (at least the fast threshold): above it the fast flag stands. The
    cost of a rule is the extra views per cell, (slow views - fast views) x slow share; the cheapest
    qualifying rule wins. When none qualifies, every cell takes the reference's views.

    Args:
        fast: decisions of the fast path on validation cells (``Bundle.decide``).
        slow: decisions of the slow path on the same cells, or {view count: decisions}.
        y: their true class indices.
        fast_views: the fast path's view count.
        slow_views: the slow path's view count when ``slow`` is a single Prediction.
        fast_abstain, fast_ood: the fast path's abstain and OOD thresholds.
        reference: the decisions the cascade must match (default: the slow path with most views).
        tolerance: allowed shortfall against the reference.
        grid: candidate cuts per criterion.
    """
    from hematoscope.bundle.base import CascadeRule

    slows = dict(slow) if isinstance(slow, dict) else {slow_views: slow}
    ref_views = max(slows)
    ref = reference if reference is not None else slows[ref_views]
    y = np.asarray(y)
    conf = fast.confidence
    score = np.asarray(fast.ood_score, dtype=np.float64)
    has_ood = fast_ood is not None and bool(np.isfinite(score).any())
    p_ref, a_ref = ref.probs.argmax(1), np.asarray(ref.abstain, bool)
    acc_ref = float(np.mean(p_ref == y))
    abst_ref = float(np.mean(a_ref))
    acc_ans_ref = float(np.mean((p_ref == y)[~a_ref])) if (~a_ref).any() else 0.0

    qs = np.linspace(0, 1, grid)
    above = conf[conf >= fast_abstain]
    conf_cuts = np.unique(np.concatenate([[fast_abstain], np.quantile(above, qs) if len(above) else [], [1.01]]))
    below = score[np.isfinite(score) & (score <= fast_ood)] if has_ood else np.zeros(0)
    ood_cuts: list[float | None] = (list(np.unique(np.concatenate([np.quantile(below, qs) if len(below) else [],
                                                                    [fast_ood]]))) if has_ood else [None])
    best = None
    for views, sl in sorted(slows.items()):
        reject = None
        if has_ood:
            accepted = ~np.asarray(sl.ood_flag, bool) & np.isfinite(score)
            reject = float(max(fast_ood, score[accepted].max())) if accepted.any() else float(fast_ood)
        for o in ood_cuts:
            for c in conf_cuts:
                take, pred, abst = cascade_decisions(fast, sl, min_confidence=float(c),
                                                     max_ood=None if o is None else float(o), reject_ood=reject)
                acc = float(np.mean(pred == y))
                ab = float(np.mean(abst))
                acc_ans = float(np.mean((pred == y)[~abst])) if (~abst).any() else 0.0
                if (acc < acc_ref - tolerance.accuracy or acc_ans < acc_ans_ref - tolerance.accuracy_answered
                        or ab > abst_ref + tolerance.abstained):
                    continue
                share = float(np.mean(take))
                key = ((views - fast_views) * share, -views, -acc, -acc_ans)
                if best is None or key < best[0]:
                    agree = float(np.mean((pred == p_ref) & (abst == a_ref)))
                    best = (key, views, float(c), None if o is None else float(o), reject,
                            {"n": int(len(y)), "slow_share": share, "extra_views_per_cell": (views - fast_views) * share,
                             "accuracy": acc, "abstained": ab, "accuracy_answered": acc_ans,
                             "agreement_with_reference": agree, "reference_views": ref_views,
                             "reference_accuracy": acc_ref, "reference_abstained": abst_ref,
                             "reference_accuracy_answered": acc_ans_ref,
                             "fast_accuracy": float(np.mean(fast.probs.argmax(1) == y)),
                             "tolerance": {"accuracy": tolerance.accuracy,
                                           "accuracy_answered": tolerance.accuracy_answered,
                                           "abstained": tolerance.abstained}})
    if best is None:  # nothing qualifies: every cell takes the reference's views
        return CascadeRule(fast_views=fast_views, slow_views=ref_views, min_confidence=1.01, max_ood=None,
                           reject_ood=None, val={"n": int(len(y)), "slow_share": 1.0, "accuracy": acc_ref,
                                                 "abstained": abst_ref, "reference_views": ref_views,
                                                 "note": "no cheaper rule qualified"})
    _, views, c, o, reject, val = best
    return CascadeRule(fast_views=fast_views, slow_views=views, min_confidence=c, max_ood=o, reject_ood=reject,
                       val=val)
