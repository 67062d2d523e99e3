"""Fit everything a bundle needs to say "I don't know": temperature, OOD scorer + threshold,
abstain threshold."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hematoscope.trust.calibration import (expected_calibration_error, fit_temperature, nll, softmax)
from hematoscope.bundle.ood import ScorerError, accept_levels, get_scorer

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle, ModelOutput

#: Default cost of abstaining relative to a wrong answer: a human review of one image is taken
#: to cost a quarter of a misclassified cell. With calibrated probabilities Chow's rule then
#: abstains below a confidence of 1 - 0.25 = 0.75.
DEFAULT_ABSTAIN_COST = 0.25


#: OOD score fitted when the model gives features: on PBC it flags non-cells and corrupted
#: cells as well as Mahalanobis does and unknown cell types far better (docs/trust.md).
DEFAULT_FEATURE_METHOD = "knn_energy"

def class_indices(bundle: "Bundle", y: np.ndarray) -> np.ndarray:
    """``y`` as integer indices into ``bundle.labels`` (accepts indices or label names).

    Raises:
        ValueError: a label name is not one of the bundle's classes.
    """
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    index = {lab: i for i, lab in enumerate(bundle.labels)}
    unknown = sorted({str(v) for v in y} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of bundle {bundle.name!r} ({bundle.labels})")
    return np.array([index[str(v)] for v in y], dtype=np.int64)


def fit_trust(
    bundle: "Bundle",
    *,
    train: tuple["ModelOutput", np.ndarray],
    val: tuple["ModelOutput", np.ndarray],
    target_tpr: float = 0.95,
    method: str | None = None,
    abstain_min_confidence: float | None = None,
    abstain_cost: float = DEFAULT_ABSTAIN_COST,
    val_scores: np.ndarray | None = None,
    val_name: str = "val",
    scorer_params: dict | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """Calibrate a bundle and give it an OOD scorer and an abstain threshold, in place.

    1. Temperature: fitted on the validation logits (NLL), or ``temperature`` when given;
       ECE before/after is recorded.
    2. OOD scorer ``method`` (default ``knn_energy`` when the model gives features, else
       ``energy``) fitted on the training outputs; its threshold is the ``target_tpr``
       quantile of the validation scores, so that fraction of in-distribution images is accepted.
    3. Abstain threshold: ``abstain_min_confidence`` when given, otherwise Chow's rule on the
       calibrated probabilities: abstain when confidence < ``1 - abstain_cost``, the point
       below which answering is expected to cost more than a review (an error costs 1, a
       review ``abstain_cost``).

    Sets ``bundle.config.temperature``, ``.ood``, ``.abstain_threshold``, ``bundle.ood`` and
    ``bundle.metrics["calibration"]`` / ``["trust"]``; the caller saves the bundle.

    Args:
        bundle: any bundle kind.
        train: (model outputs, labels) on training images, labels as indices or names.
        val: (model outputs, labels) on validation images, disjoint from ``train``.
        target_tpr: fraction of in-distribution validation images the OOD flag must accept.
        method: a registered scorer name (:func:`hematoscope.trust.list_scorers`).
        abstain_min_confidence: fixed abstain threshold in [0, 1] instead of Chow's rule.
        abstain_cost: cost of one abstention relative to one error, in (0, 1).
        val_scores: OOD scores of ``val`` computed elsewhere, for when ``val`` is ``train`` seen
            out of fold (cross-fitting): each score from a scorer fitted without that image.
        val_name: what ``val`` is, recorded in the metrics.
        scorer_params: keyword arguments of the OOD scorer (e.g. ``{"k": 3}`` for ``knn``).
        temperature: a fixed temperature (> 0), for validation logits it cannot be fitted on
            (e.g. the training images' own, seen in fold).

    Returns:
        A JSON-able report: temperature, ECE/NLL before and after, OOD config, validation
        acceptance and selective accuracy.

    Raises:
        ValueError: invalid arguments, or a feature scorer asked for a model without features.
    """
    if not 0 < target_tpr < 1:
        raise ValueError(f"target_tpr must be in (0, 1), got {target_tpr}")
    if not 0 < abstain_cost < 1:
        raise ValueError(f"abstain_cost must be in (0, 1), got {abstain_cost}")
    if abstain_min_confidence is not None and not 0 <= abstain_min_confidence <= 1:
        raise ValueError(f"abstain_min_confidence must be in [0, 1], got {abstain_min_confidence}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    (train_out, train_y), (val_out, val_y) = train, val
    train_y, val_y = class_indices(bundle, train_y), class_indices(bundle, val_y)

    temperature = fit_temperature(val_out.logits, val_y) if temperature is None else float(temperature)
    probs_before, probs_after = softmax(val_out.logits), softmax(val_out.logits, temperature)
    calibration = {
        "split": val_name,
        "n": int(len(val_y)),
        "temperature": temperature,
        "ece_before": expected_calibration_error(probs_before, val_y),
        "ece_after": expected_calibration_error(probs_after, val_y),
        "nll_before": nll(val_out.logits, val_y),
        "nll_after": nll(val_out.logits, val_y, temperature),
    }

    method = method or (DEFAULT_FEATURE_METHOD if train_out.features is not None else "energy")
    cls = get_scorer(method)
    if cls.needs_features and (train_out.features is None or val_out.features is None):
        raise ScorerError(f"OOD method {method!r} needs penultimate features, which this "
                          f"{bundle.kind} bundle does not give; use 'energy' or 'max_softmax'")
    scorer = cls(temperature=temperature) if method == "max_softmax" else cls(**(scorer_params or {}))
    scorer.fit(train_out.features, train_y, train_out.logits)
    if val_scores is None:
        val_scores = scorer.score(features=val_out.features, logits=val_out.logits)
    elif len(val_scores) != len(val_y):
        raise ValueError(f"val_scores has {len(val_scores)} scores for {len(val_y)} validation images")
    scorer.threshold = float(np.quantile(val_scores, target_tpr))
    scorer.target_tpr = float(target_tpr)
    scorer.accept_levels = accept_levels(val_scores)

    abstain = float(abstain_min_confidence) if abstain_min_confidence is not None else 1.0 - abstain_cost
    bundle.config.temperature = temperature
    bundle.config.abstain_threshold = abstain
    bundle.config.ood = scorer.config()
    bundle.config.ood_accept = None  # a refit sets the operating point anew
    bundle.ood = scorer

    flagged = val_scores > scorer.threshold
    low = probs_after.max(1) < abstain
    accepted = ~(flagged | low)
    correct = probs_after.argmax(1) == val_y
    trust = {
        "split": val_name,
        "ood_method": method,
        "ood_threshold": scorer.threshold,
        "val_ood_accept_rate": float(np.mean(~flagged)),
        "abstain_threshold": abstain,
        "abstain_rule": "user value" if abstain_min_confidence is not None else f"chow, cost {abstain_cost}",
        "val_coverage": float(accepted.mean()),
        "val_accuracy": float(correct.mean()),
        "val_accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else None,
    }
    bundle.metrics["calibration"] = calibration
    bundle.metrics["trust"] = trust
    mirror_calibration(bundle.metrics)
    bundle._retire_view_trust()  # one view count's settings: earlier per-view entries no longer apply
    bundle.trust_views = bundle.config.tta  # what these settings were fitted for
    return {"calibration": calibration, "ood": bundle.config.ood.model_dump(), **trust}


def bundle_outputs(bundle: "Bundle", paths: Sequence[str], *, batch_size: int = 64,
                   description: str = "scoring") -> tuple["ModelOutput", np.ndarray]:
    """Run ``bundle.forward`` (its ``config.tta`` views) over image files, decoded as on every
    other path (:func:`~hematoscope.data.images.load_model_image`).

    Returns:
        The concatenated outputs of the readable files and their indices into ``paths``
        (unreadable files are left out).
    """
    views = bundle.config.tta if bundle.supports_tta else 1
    out, kept = bundle_view_outputs(bundle, paths, views=views, batch_size=batch_size, description=description)
    return out.averaged(views), kept


def bundle_view_outputs(bundle: "Bundle", paths: Sequence[str], *, views: int | None = None, batch_size: int = 64,
                        description: str = "scoring"):
    """Every test-time view's raw outputs over image files (default: all the bundle can
    average), decoded in threads with :func:`~hematoscope.data.images.load_model_image`.

    Returns:
        (:class:`~hematoscope.bundle.base.ViewOutputs` of the readable files, their indices into
        ``paths``).
    """
    from hematoscope.bundle.base import ViewOutputs
    from hematoscope.data.sources import ImageSource
    from hematoscope.progress import track

    views = bundle.max_views if views is None else views
    items = [ImageSource(str(i), Path(p)) for i, p in enumerate(paths)]
    parts, kept = [], []
    batches = bundle.iter_view_outputs(items, views=views, batch_size=batch_size)  # decoded while the model runs
    for batch, out in track(batches, total=-(-len(items) // batch_size), description=description):
        parts.append(out)
        kept.extend(int(s) for s in batch.sources)
    if not kept:
        return ViewOutputs(np.zeros((views, 0, len(bundle.labels)), np.float32), None), np.zeros(0, int)
    return ViewOutputs.concat(parts), np.asarray(kept, int)


def table_targets(bundle: "Bundle", table) -> np.ndarray:
    """Class index in ``bundle.labels`` of each row (its canonical label or an ancestor); -1
    when the row's label is not one of the bundle's classes."""
    from hematoscope.data.samples import class_column
    from hematoscope.taxonomy import TAXONOMY

    col = class_column(table)
    index = {lab: i for i, lab in enumerate(bundle.labels)}
    return np.array([index.get(TAXONOMY.match(str(c), bundle.labels) if c is not None else None, -1)
                     for c in col], dtype=np.int64)


def fit_trust_on_table(bundle: "Bundle", table, *, max_train: int = 5000, seed: int = 0,
                       batch_size: int = 64, **fit_kwargs) -> dict[str, Any]:
    """Trust for every view count (and the cascade) from a samples table, in one pass: every
    test-time view of the ``train`` and ``val`` rows (a ``split`` column is required) is run
    once, and :func:`hematoscope.trust.views.fit_view_trust` fits on the outputs.

    Args:
        bundle: any bundle kind.
        table: samples table with a ``split`` column (e.g. the split file the bundle was
            trained with; the val part must not have been used for training).
        max_train: at most this many training images (stratified random subset, ``seed``) are
            run through the model to fit the OOD scorer.
        seed: seed of that subset.
        batch_size: images per forward pass.
        **fit_kwargs: passed to ``fit_view_trust`` (views, default_views, cascade, target_tpr,
            method, abstain_min_confidence ...).

    Returns:
        ``fit_view_trust``'s report plus the bundle-wide ``fit_trust`` keys of the default view
        count (``calibration``, ``ood_method`` ...), ``n_train`` and ``n_val``.

    Raises:
        ValueError: no ``split`` column, or no usable train/val rows.
    """
    from hematoscope.trust.views import fit_view_trust

    if "split" not in table.columns:
        raise ValueError("the data needs a 'split' column with train and val rows "
                         "(make one with `hematoscope data split`)")
    targets = table_targets(bundle, table)
    parts = {}
    for name in ("train", "val"):
        rows = np.flatnonzero((table["split"].to_numpy() == name) & (targets >= 0))
        if len(rows) == 0:
            raise ValueError(f"no {name} rows whose labels are classes of the bundle ({bundle.labels})")
        if name == "train" and len(rows) > max_train:
            from sklearn.model_selection import train_test_split

            rows, _ = train_test_split(rows, train_size=max_train, random_state=seed, stratify=targets[rows])
        paths = [str(p) for p in table["path"].to_numpy()[rows]]
        views = max(fit_kwargs.get("views") or [bundle.max_views])
        out, kept = bundle_view_outputs(bundle, paths, views=views, batch_size=batch_size,
                                        description=f"{name} images, {views} view{'s' if views > 1 else ''}")
        parts[name] = (out, targets[rows][kept])
    report = fit_view_trust(bundle, train=parts["train"], val=parts["val"], **fit_kwargs)
    report.update({k: v for k, v in report["base"].items() if k not in report})
    report["n_train"], report["n_val"] = len(parts["train"][1]), len(parts["val"][1])
    return report


#: Training images the framing search's size reference is measured on (``ReframeRule.size_ref``).
SIZE_REFERENCE_IMAGES = 1000


def size_reference_images(table, preprocess, n: int = SIZE_REFERENCE_IMAGES, seed: int = 0) -> list[np.ndarray]:
    """``n`` training images of a split table (a seeded sample), decoded for ``preprocess``: what
    :meth:`Bundle.set_reframe` measures the size reference on."""
    from hematoscope.data.images import load_model_image

    train = table[table["split"] == "train"]
    paths = train.sample(min(n, len(train)), random_state=seed)["path"]
    return [load_model_image(p, preprocess) for p in paths]


def mirror_calibration(metrics: dict) -> None:
    """Copy a refit's temperature and ECE onto the top-level keys a training run also wrote
    (``train`` records them beside ``calibration``), so the card and ``/api/models`` do not show
    the values of the fit that was replaced."""
    calibration = metrics.get("calibration") or {}
    for key in ("temperature", "ece_before", "ece_after"):
        if key in metrics and key in calibration:
            metrics[key] = calibration[key]
