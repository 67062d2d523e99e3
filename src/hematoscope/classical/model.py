"""Train the classical pipeline: features → class-weighted XGBoost with early stopping →
IsolationForest anomaly flag and calibration (via :func:`hematoscope.trust.fit_trust`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: XGBoost parameters of ``hematoscope classical train`` (hist trees; threads = ``n_jobs``).
DEFAULT_XGB_PARAMS: dict[str, Any] = {
    "objective": "multi:softprob",
    "eval_metric": "mlogloss",
    "tree_method": "hist",
    "eta": 0.15,
    "max_depth": 5,
    "max_bin": 128,
    "min_child_weight": 1.0,
    "subsample": 0.8,
    "colsample_bytree": 0.4,
    "lambda": 1.0,
}


@dataclass
class TrainResult:
    """What :func:`train_classical` produced: the bundle plus timings and validation numbers."""

    bundle: Any
    report: dict = field(default_factory=dict)


def fit_booster(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int, *,
                feature_names: list[str], seed: int = 0, max_rounds: int = 2000, early_stopping: int = 25,
                params: dict | None = None):
    """Class-weighted multi-class XGBoost, stopped early on the validation log-loss.

    Returns:
        The ``xgboost.Booster`` truncated to its best iteration.
    """
    import xgboost as xgb
    from sklearn.utils.class_weight import compute_sample_weight

    p = {**DEFAULT_XGB_PARAMS, **(params or {}), "num_class": n_classes, "seed": seed}
    dtrain = xgb.DMatrix(x_train, label=y_train, weight=compute_sample_weight("balanced", y_train),
                         feature_names=feature_names)
    dval = xgb.DMatrix(x_val, label=y_val, weight=compute_sample_weight("balanced", y_val),
                       feature_names=feature_names)
    booster = xgb.train(p, dtrain, num_boost_round=max_rounds, evals=[(dval, "val")],
                        early_stopping_rounds=early_stopping, verbose_eval=False)
    return booster[: booster.best_iteration + 1]


def train_classical(table, *, val: float = 0.1, seed: int = 0, n_jobs: int = 2, name: str = "classical",
                    target_tpr: float = 0.95, params: dict | None = None, progress: bool = False,
                    fold: int | None = None) -> TrainResult:
    """Train a classical bundle on a samples table.

    Uses the table's ``split`` column when it has one (``train`` rows train, ``val`` rows stop
    early and fit the anomaly threshold, others are ignored; of a k-fold file, ``fold`` is val
    and the other folds train: :func:`~hematoscope.data.splits.train_val_rows`); otherwise a stratified ``val``
    fraction is split off with :func:`hematoscope.data.splits.make_split`, by group when the
    table's ``patient`` column has ids (crops of one cell stay on one side). Unreadable images are
    left out and counted.

    Args:
        table: samples DataFrame (``path``, ``label``, ``canonical`` ...), e.g. from ``read_dataset``,
            or a dataset folder or split file to read as one.
        val: validation fraction when the table has no split.
        seed: seed of the split, XGBoost and the IsolationForest.
        n_jobs: feature-extraction processes and XGBoost threads.
        name: bundle name.
        target_tpr: fraction of validation images the anomaly flag must accept.
        params: XGBoost parameter overrides.
        progress: show progress bars.

    Returns:
        :class:`TrainResult` with the (unsaved) ``ClassicalBundle`` and a JSON-able report.

    Raises:
        ValueError: fewer than 2 classes, or a class with no training/validation image.
        MissingExtraError: scikit-image or XGBoost is not installed.
    """
    from hematoscope._extras import require

    require("xgboost", "skimage", extra="classical", purpose="classical training")  # before hours of features
    from hematoscope.bundle.base import BundleConfig, ModelOutput
    from hematoscope.classical.bundle import ClassicalBundle, classical_preprocess
    from hematoscope.classical.features import FEATURE_NAMES, FEATURE_VERSION, ClassicalFeatures
    from hematoscope.data.samples import class_column, class_names, require_labels, resolve_group_by
    from hematoscope.taxonomy import TAXONOMY_VERSION
    from hematoscope.trust import fit_trust

    from hematoscope.data.readers import as_table
    from hematoscope.data.splits import make_split, train_val_rows

    table = as_table(table)
    df = train_val_rows(table, fold=fold)
    if df is None:
        df = make_split(table, val=val, test=0.0, seed=seed, group_by=resolve_group_by(table))
    require_labels(df, "training")
    names = class_column(df).tolist()
    labels = class_names(df)
    if len(labels) < 2:
        raise ValueError(f"need at least 2 classes to train; found {labels}")
    y = np.array([labels.index(n) for n in names])
    is_train = (df["split"] == "train").to_numpy()
    for part, mask in (("training", is_train), ("validation", ~is_train)):
        missing = [labels[k] for k in range(len(labels)) if not (y[mask] == k).any()]
        if missing:
            sizes = np.bincount(y, minlength=len(labels))
            few = {c: int(sizes[labels.index(c)]) for c in missing if sizes[labels.index(c)] < 2}
            if few:  # a class of one image cannot be on both sides, whatever --val
                raise ValueError("a class needs at least 2 images (one to train on, one to validate): "
                                 + ", ".join(f"{c} has {n}" for c, n in few.items())
                                 + "; add images of it or leave its folder out")
            raise ValueError(f"no {part} images for classes {missing}; use more data or a larger --val")

    t0 = time.perf_counter()
    x = ClassicalFeatures(n_jobs=n_jobs, on_error="nan", progress=progress).transform(df["path"].tolist())
    t_features = time.perf_counter() - t0
    readable = ~np.isnan(x[:, FEATURE_NAMES.index("seg_ok")])
    x_tr, y_tr = x[is_train & readable], y[is_train & readable]
    x_val, y_val = x[~is_train & readable], y[~is_train & readable]

    t0 = time.perf_counter()
    booster = fit_booster(x_tr, y_tr, x_val, y_val, len(labels), feature_names=FEATURE_NAMES, seed=seed,
                          params={"nthread": n_jobs, **(params or {})})
    t_train = time.perf_counter() - t0
    config = BundleConfig(
        kind="classical", name=name, labels=labels, taxonomy_version=TAXONOMY_VERSION,
        preprocess=classical_preprocess().to_dict(),
        model={"type": "xgboost", "feature_version": FEATURE_VERSION, "feature_names": FEATURE_NAMES,
               "n_features": len(FEATURE_NAMES), "best_iteration": int(booster.num_boosted_rounds()),
               "input": "decoded by load_model_image, edge bars painted as slide background, squashed to "
                        "128 x 128 px (bilinear); features in working pixels"},
        training={"recipe": "classical", "xgboost": {**DEFAULT_XGB_PARAMS, **(params or {})}, "seed": seed,
                  "n_train": int(len(y_tr)), "n_val": int(len(y_val)), "unreadable": int((~readable).sum()),
                  "feature_seconds": round(t_features, 1), "train_seconds": round(t_train, 1)},
        data_sources=sorted({str(d) for d in df["dataset"].dropna()}) if "dataset" in df else [],
    )
    bundle = ClassicalBundle(config, booster)
    train_out = ModelOutput(bundle.logits_of(x_tr), x_tr)
    val_out = ModelOutput(bundle.logits_of(x_val), x_val)
    trust = fit_trust(bundle, train=(train_out, y_tr), val=(val_out, y_val), method="isolation_forest",
                      target_tpr=target_tpr)
    val_metrics = _metrics(y_val, val_out.logits.argmax(1))
    bundle.metrics["val"] = {"split": "val", "n": int(len(y_val)), **val_metrics}
    report = {"labels": labels, "n_train": int(len(y_tr)), "n_val": int(len(y_val)),
              "unreadable": int((~readable).sum()), "feature_seconds": t_features, "train_seconds": t_train,
              "rounds": int(booster.num_boosted_rounds()), "val": val_metrics, "trust": trust}
    return TrainResult(bundle, report)


def _metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "f1_weighted": float(f1_score(y_true, y_pred, average="weighted")),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro"))}
