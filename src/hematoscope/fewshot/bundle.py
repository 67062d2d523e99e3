"""Few-shot bundle (kind ``"fewshot"``): a frozen backbone + a scikit-learn head on its features.

It behaves like any other bundle (``load_bundle``, ``Bundle.predict``, ``hematoscope predict`` /
``evaluate``, the web app): ``forward`` returns log-probabilities as logits and the backbone
features for the out-of-distribution scorer.

Files (besides the common ``config.json``, ``metrics.json``, ``README.md``, ``ood.safetensors``)::

    head.safetensors       training features, target indices (-1 = unlabelled) and probe
                           probabilities; a self-training head also its final labels
                           (``transduction``), so the refit at load needs no iterations
    backbone.safetensors   backbone weights, when they came from a file, URL or hub (the offline
                           ImageNet Lite0 is referenced by name instead)
    backbone/              the source bundle, when features come from another bundle

The head is refitted from the stored features at load (see :mod:`hematoscope.fewshot.heads`);
the stored probe probabilities must be reproduced, else loading fails loudly.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hematoscope.bundle.base import Bundle, BundleConfig, BundleError, ModelOutput, register_bundle_kind
from hematoscope.fewshot.features import FeatureExtractor, TimmFeatureExtractor, load_extractor
from hematoscope.fewshot.heads import HeadSpec
from hematoscope.models.backbones import OFFLINE_WEIGHTS, PACKAGED_WEIGHTS

#: Weights referenced by name (installed with the package or its dependencies), never copied.
_NAMED_WEIGHTS = {OFFLINE_WEIGHTS, *PACKAGED_WEIGHTS}

HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_DIR = "backbone"
#: Probabilities are clipped here before the log, so log-probabilities stay finite.
MIN_PROB = 1e-6
_PROBE_ROWS = 16
_PROBE_TOL = 1e-4


@register_bundle_kind("fewshot")
class FewShotBundle(Bundle):
    """Frozen-feature classifier.

    Args:
        config: the bundle config (``model`` holds ``backbone`` and ``head`` descriptions).
        extractor: the feature extractor (backbone + preprocessing + TTA).
        head: a fitted scikit-learn pipeline whose classes are indices into ``config.labels``.
        train_features, train_targets: what the head was fitted on (kept for refit at load).
    """

    weight_files = (HEAD_FILE, BACKBONE_FILE, BACKBONE_DIR)

    def __init__(self, config: BundleConfig, extractor: FeatureExtractor, head, train_features: np.ndarray,
                 train_targets: np.ndarray, metrics: dict | None = None, path: Path | None = None):
        super().__init__(config, metrics, path)
        self.extractor = extractor
        self.head = head
        self.train_features = np.asarray(train_features, np.float32)
        self.train_targets = np.asarray(train_targets, np.int64)

    @classmethod
    def fit(cls, extractor: FeatureExtractor, features: np.ndarray, y: Sequence[str], *,
            head: str | HeadSpec = "lr", labels: Sequence[str] | None = None, name: str = "fewshot",
            training: dict | None = None, data_sources: Sequence[str] = (),
            unlabelled: np.ndarray | None = None) -> "FewShotBundle":
        """Fit a head on precomputed features and wrap it as a bundle.

        Args:
            extractor: the extractor that produced ``features``.
            features: (N, D) training features.
            y: class name of each row (canonical names).
            head: head name or spec.
            labels: class names in output order (default: sorted unique ``y``).
            name: bundle name.
            training: recipe details recorded in ``config.training``.
            data_sources: dataset names recorded in the config.
            unlabelled: (M, D) features of unlabelled images, used by self-training heads.

        Raises:
            ValueError: fewer than two classes, or a label of ``y`` not in ``labels``.
        """
        spec = head if isinstance(head, HeadSpec) else HeadSpec.parse(head)
        labels = list(labels) if labels is not None else sorted({str(v) for v in y})
        if len(labels) < 2:
            raise ValueError(f"need at least 2 classes to fit a head; got {labels}")
        index = {lab: i for i, lab in enumerate(labels)}
        unknown = sorted({str(v) for v in y} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among {labels}")
        targets = np.array([index[str(v)] for v in y], np.int64)
        features = np.asarray(features, np.float32)
        if spec.self_training is not None:
            features, targets = _with_unlabelled(features, targets, unlabelled)
        t0 = time.perf_counter()
        pipeline = _fit_head(spec, features, targets)
        fit_seconds = time.perf_counter() - t0
        from hematoscope.taxonomy import TAXONOMY_VERSION

        config = BundleConfig(
            kind="fewshot", name=name, labels=labels, taxonomy_version=TAXONOMY_VERSION,
            preprocess=extractor.preprocess.to_dict(),
            model={"backbone": extractor.describe(), "views": extractor.views,
                   "head": spec.to_dict(),
                   "feature_dim": int(np.shape(features)[1]), "extractor_identity": extractor.identity},
            training={**(training or {}), "n_train": int((targets >= 0).sum()),
                      "n_unlabelled": int((targets < 0).sum()),
                      "per_class": {lab: int((targets == i).sum()) for i, lab in enumerate(labels)},
                      "head_fit_seconds": round(fit_seconds, 3)},
            data_sources=list(data_sources),
        )
        return cls(config, extractor, pipeline, features, targets)

    @property
    def views_per_image(self) -> int:
        return self.extractor.views  # the backbone's features are averaged over its views

    # --- inference -----------------------------------------------------------------------
    def logits_from_features(self, features: np.ndarray) -> np.ndarray:
        """Log-probabilities (N, C) in ``labels`` order from backbone features."""
        return _head_logits(self.head, features, len(self.labels))

    def forward(self, images: Sequence[np.ndarray]) -> ModelOutput:
        feats = self.extractor.embed_arrays(list(images))
        return ModelOutput(self.logits_from_features(feats), feats)

    def outputs(self, features: np.ndarray) -> ModelOutput:
        """ModelOutput for precomputed features (for trust fitting and evaluation)."""
        return ModelOutput(self.logits_from_features(features), np.asarray(features, np.float32))

    # --- persistence ---------------------------------------------------------------------
    def _save_weights(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        from hematoscope import _io

        probe = self.head.predict_proba(self.train_features[:_PROBE_ROWS]).astype(np.float64)
        arrays = {"features": np.ascontiguousarray(self.train_features), "targets": self.train_targets,
                  "probe": probe}
        trans = _transduction(self.head)
        if trans is not None:  # self-training: its final labels make the refit at load one step
            arrays["transduction"] = trans
        with _io.atomic_path(directory / HEAD_FILE, ".safetensors") as tmp:
            save_file(arrays, str(tmp))
        backbone = self.config.model.backbone
        if backbone["type"] == "bundle":
            self.extractor.bundle.save(directory / BACKBONE_DIR)
            onnx = self.extractor.onnx_file()  # the backbone's checked ONNX model travels with it
            if onnx is not None:
                _io.write_bytes(directory / BACKBONE_DIR / onnx.name, onnx.read_bytes())
        elif backbone.get("weights") not in _NAMED_WEIGHTS:
            from safetensors.torch import save_file as save_torch

            if not isinstance(self.extractor, TimmFeatureExtractor):
                raise BundleError(f"cannot save backbone weights of a {type(self.extractor).__name__}")
            state = {k: v.detach().contiguous() for k, v in self.extractor.model.state_dict().items()}
            with _io.atomic_path(directory / BACKBONE_FILE, ".safetensors") as tmp:
                save_torch(state, str(tmp))

    @classmethod
    def _load_weights(cls, config: BundleConfig, directory: Path, metrics: dict) -> "FewShotBundle":
        m = config.model
        backbone, views = m.backbone, m.view_count
        if backbone["type"] == "bundle":
            extractor = load_extractor(directory / BACKBONE_DIR, views=views)
        elif backbone["type"] == "timm":
            named = backbone.get("weights") in _NAMED_WEIGHTS
            weights = backbone["weights"] if named else directory / BACKBONE_FILE
            extractor = load_extractor(backbone["arch"], weights=weights, views=views,
                                       preprocess=config.preprocess,
                                       pooling=backbone.get("pooling"), layers=backbone.get("layers", 4),
                                       model_kwargs=backbone.get("model_kwargs"))
        else:
            raise BundleError(f"unknown few-shot backbone type {backbone['type']!r}")
        from hematoscope import _io

        arrays = _io.read_safetensors(directory / HEAD_FILE)
        spec = HeadSpec.from_dict(m.head)
        if spec.self_training is not None and "transduction" in arrays:
            head = _fit_head(spec, arrays["features"], arrays["transduction"], replay=True)
        else:
            head = _fit_head(spec, arrays["features"], arrays["targets"])
        probe = head.predict_proba(arrays["features"][:_PROBE_ROWS])
        if probe.shape != arrays["probe"].shape or np.abs(probe - arrays["probe"]).max() > _PROBE_TOL:
            raise BundleError(f"{directory}: the refitted {spec.name} head does not reproduce the saved "
                              "probabilities (different scikit-learn version?); refit the bundle")
        return cls(config, extractor, head, arrays["features"], arrays["targets"], metrics, directory)


def _fit_head(spec: HeadSpec, features: np.ndarray, targets: np.ndarray, *, replay: bool = False):
    """``spec.build().fit(...)``; a self-training head with every image labelled is fine as is
    (scikit-learn warns that there is nothing unlabelled).

    ``replay``: ``targets`` are a fitted self-training head's final labels (pseudo-labels
    included, -1 for images never labelled): the head is rebuilt without iterating (the
    transform sees every row, the classifier the labelled ones, exactly as in the last step of
    the original fit), in a fraction of the time.
    """
    import warnings

    head = spec.build()
    if replay and spec.self_training is not None:
        head.set_params(clf__max_iter=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y contains no unlabeled samples")
        return head.fit(features, targets)


def _transduction(head) -> np.ndarray | None:
    """A fitted self-training head's final labels (None for other heads)."""
    clf = head[-1] if hasattr(head, "steps") else head
    trans = getattr(clf, "transduction_", None)
    return None if trans is None else np.asarray(trans, np.int64)


def fit_fewshot_bundle(table, extractor: FeatureExtractor, *, labels_per_class: int | None = 50,
                       head: str | HeadSpec = "lr", seed: int = 0, val_per_class: int | None = None,
                       unlabelled_per_class: int | None = 400, max_unlabelled: int | None = None,
                       group_by: str | None = "auto", name: str | None = None, ood_method: str = "knn",
                       progress: bool = True) -> tuple[FewShotBundle, dict[str, Any]]:
    """Draw ``labels_per_class`` images per class from ``table`` (a samples table, or a dataset
    folder or split file to read as one), fit a head on their features,
    and calibrate it (temperature, OOD scorer, abstain threshold) on a disjoint validation draw.

    The validation draw (``val_per_class``, default between 10 and 50 matching the shots) comes
    from the labelled images not used for training; when fewer than 5 per class remain (a lab
    that labelled just the cells it trains on), the trust is cross-fitted on the draw itself
    (:func:`_crossfit_trust`). Rows without a label (a lab's own unlabelled crops) are never
    drawn; a self-training head (e.g. ``"svm+self"``) gets them, and up to
    ``unlabelled_per_class`` of the remaining labelled images per class, without labels (at
    most ``max_unlabelled`` in all).

    With ``group_by`` (default: the ``patient`` column when it has ids, e.g. the crops of one
    cell) labels are drawn as different groups, one image each, and the validation images come
    from groups not drawn for training.

    A split file's table (``split`` column) gives only its train + val rows (as ``fewshot
    bench``): its test rows, and any other row sharing a file or group with them (e.g. the same
    image among unlabelled crops), are neither drawn nor self-trained on, so scoring the bundle
    on the test rows stays honest.

    Returns:
        (bundle, report) where report holds counts (``n_test_left_out``: the test rows;
        ``n_overlap_left_out``: the rows sharing a file or group with them), timings and the
        trust report.

    Raises:
        ValueError: no labelled or no readable images, or fewer than two classes.
    """
    from hematoscope.data.samples import class_column, group_keys, has_label, resolve_group_by
    from hematoscope.bundle.config import seen_fingerprints
    from hematoscope.data.readers import as_table
    from hematoscope.data.splits import hash_files, shares_with_test, split_parts
    from hematoscope.fewshot.shots import sample_shots

    spec = head if isinstance(head, HeadSpec) else HeadSpec.parse(head)
    table, test_rows = split_parts(as_table(table))
    group_col = resolve_group_by(table, group_by)
    overlap = np.zeros(len(table), bool) if test_rows is None else shares_with_test(table, test_rows, group_col)
    table = table[~overlap].reset_index(drop=True)
    y_all = class_column(table)
    paths = table["path"].astype(str).to_numpy()
    labelled = has_label(table)
    if not labelled.any():
        raise ValueError("no row has a label: a few-shot head needs labelled images")
    groups = group_keys(table, group_col)
    rows = np.flatnonzero(labelled)  # drawing, validation and leftovers are among labelled rows only
    draw = sample_shots(y_all[rows], labels_per_class, seed=seed, groups=None if groups is None else groups[rows])
    drawn = rows[draw.indices]
    rest = np.setdiff1d(rows, drawn)
    if groups is not None:  # other images of a drawn group are neither validation nor unlabelled
        rest = rest[~np.isin(groups[rest], groups[drawn])]
    n_val = val_per_class or int(min(50, max(10, labels_per_class or 50)))
    val_idx = rest[sample_shots(y_all[rest], n_val, seed=seed + 1,
                                groups=None if groups is None else groups[rest]).indices]
    t0 = time.perf_counter()
    fs = extractor.extract(list(paths[drawn]), progress=progress)
    if len(fs.features) == 0:
        raise ValueError("none of the drawn training images could be read")
    y_train = y_all[drawn][fs.ok]
    unlabelled, free = None, np.zeros(0, int)
    if spec.self_training is not None:
        free = np.setdiff1d(rest, val_idx)
        if groups is not None:
            free = free[~np.isin(groups[free], groups[val_idx])]
        free = free[sample_shots(y_all[free], unlabelled_per_class, seed=seed + 2).indices] \
            if unlabelled_per_class != 0 else free[:0]
        # the user's unlabelled rows (e.g. the lab's own crops) come first
        free = np.concatenate([np.flatnonzero(~labelled), np.random.default_rng(seed + 2).permutation(free)])
        free = free[:max_unlabelled]
        unlabelled = extractor.extract(list(paths[np.sort(free)]), progress=progress).features
    extract_seconds = time.perf_counter() - t0
    datasets = sorted({str(d) for d in table["dataset"]}) if "dataset" in table else []
    training = {"method": "frozen features + head", "labels_per_class": labels_per_class, "seed": seed,
                "group_by": group_col, "unlabelled_per_class": unlabelled_per_class if unlabelled is not None else None,
                "short_classes": draw.short, "skipped": [Path(s.source).name for s in fs.skipped]}
    if fs.skipped:  # a drawn label lost: the class has one fewer than asked
        lost = Counter(y_all[drawn][~fs.ok])
        training["short_classes"] = {c: int((y_train == c).sum()) for c in
                                     sorted(set(draw.short) | set(lost))}
    bundle = FewShotBundle.fit(extractor, fs.features, y_train, head=spec, name=name or f"fewshot-{spec.label}",
                               training=training, data_sources=datasets, unlabelled=unlabelled)
    report: dict[str, Any] = {"n_train": int(len(y_train)), "extract_seconds": round(extract_seconds, 2),
                              "head_fit_seconds": bundle.config.training.head_fit_seconds,
                              "short_classes": training["short_classes"], "group_by": group_col,
                              "skipped": [f"{s.source}: {s.reason}" for s in fs.skipped],
                              "n_unlabelled": bundle.config.training.n_unlabelled,
                              "n_test_left_out": 0 if test_rows is None else len(test_rows),
                              "n_overlap_left_out": int(overlap.sum())}
    if groups is not None:
        report["n_train_groups"] = int(len(set(groups[drawn][fs.ok])))
        bundle.config.training.n_train_groups = report["n_train_groups"]

    counts = {c: int((y_all[val_idx] == c).sum()) for c in bundle.labels}
    calibrated_on = val_idx if min(counts.values()) >= 5 else np.zeros(0, int)
    # the images it learnt from or was calibrated on: scoring them later would not be a test
    bundle.config.seen_images = seen_fingerprints(
        hash_files(list(paths[np.concatenate([drawn, free, calibrated_on])]), unreadable_as_none=True))
    if not len(calibrated_on):  # the lab labelled only what it drew: trust from the draw itself
        report["val_short"] = {c: n for c, n in counts.items() if n < 5}
        report["trust"] = _crossfit_trust(bundle, spec, fs.features, y_train, unlabelled, seed=seed,
                                          groups=None if groups is None else groups[drawn][fs.ok])
        return bundle, report
    vfs = extractor.extract(list(paths[val_idx]), progress=progress)
    y_val = y_all[val_idx][vfs.ok]
    keep = np.isin(y_val, bundle.labels)
    from hematoscope.trust import fit_trust

    trust = fit_trust(bundle, train=(bundle.outputs(fs.features), y_train),
                      val=(bundle.outputs(vfs.features[keep]), y_val[keep]), method=ood_method,
                      scorer_params={"k": knn_k(len(y_train))} if ood_method == "knn" else None)
    bundle.config.training.val_labels_per_class = n_val
    val_pred = np.asarray(bundle.labels)[bundle.logits_from_features(vfs.features[keep]).argmax(1)]
    from sklearn.metrics import balanced_accuracy_score

    bundle.metrics.update({"split": "val (disjoint draw from the training data)",
                           "val_balanced_accuracy": float(balanced_accuracy_score(y_val[keep], val_pred)),
                           "n_val": int(keep.sum())})
    report["trust"] = trust
    report["val_balanced_accuracy"] = bundle.metrics["val_balanced_accuracy"]
    return bundle, report


def knn_k(n_reference: int) -> int:
    """The neighbour whose distance is a few-shot head's OOD score: the 10th as for a trained
    model once there are 50 labelled images, fewer below (the nearest among 8)."""
    return int(min(10, max(1, n_reference // 5)))


#: Folds of the cross-fitted trust (fewer when a class has fewer labels).
CROSSFIT_FOLDS = 5


def _crossfit_trust(bundle: FewShotBundle, spec: HeadSpec, features: np.ndarray, y: np.ndarray,
                    unlabelled: np.ndarray | None, *, seed: int, groups: np.ndarray | None) -> dict:
    """Temperature, OOD scorer and threshold of ``bundle`` when no labelled image is left over
    for validation: each labelled image is seen out of fold, by a head and an OOD scorer fitted
    on the other folds (k = 5, or the smallest class's count; by ``groups`` when given), so the
    temperature is fitted on answers to images the head did not learn and the threshold on
    distances to references that do not hold the image. The head and scorer kept are those of
    all the labels: a new image's reference holds a fold more, so the threshold errs towards
    accepting. With a single label in some class there is nothing to hold out: the temperature
    stays 1 and the threshold comes from leave-one-out distances among all the labels. The OOD
    score is the distance to the k-th nearest labelled image (``knn``), k = 10 or fewer, so
    that every held-out image has k references (:func:`knn_k`)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from hematoscope.bundle.ood import get_scorer
    from hematoscope.trust import fit_trust

    targets = np.array([bundle.labels.index(v) for v in y])
    k = int(min(CROSSFIT_FOLDS, np.bincount(targets, minlength=len(bundle.labels)).min()))
    logits = bundle.logits_from_features(features)  # replaced out of fold below when k >= 2
    scores = np.empty(len(y))
    if k >= 2:
        splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if groups is not None
                    else StratifiedKFold(k, shuffle=True, random_state=seed))
        folds = splitter.split(features, targets, groups)
    else:
        folds = ((np.setdiff1d(np.arange(len(y)), [i]), np.array([i])) for i in range(len(y)))
    folds = list(folds)
    params = {"k": knn_k(min(len(f) for f, _ in folds))}
    extra = unlabelled if spec.self_training is not None else None
    for fit_idx, held in folds:
        if k >= 2:
            head = _fit_head(spec, *_with_unlabelled(features[fit_idx], targets[fit_idx], extra))
            logits[held] = _head_logits(head, features[held], len(bundle.labels))
        scores[held] = get_scorer("knn")(**params).fit(features[fit_idx]).score(features=features[held])
    how = f"cross-fitted on the {len(y)} labelled images ({k} folds)" if k >= 2 else \
        f"leave-one-out OOD distances among the {len(y)} labelled images (a class has 1 label; temperature 1)"
    out = ModelOutput(logits, features)
    # with k < 2 the logits are the head's own training images', on which no temperature fits
    return fit_trust(bundle, train=(bundle.outputs(features), y), val=(out, y), method="knn", val_scores=scores,
                     val_name=how, scorer_params=params, temperature=None if k >= 2 else 1.0)


def _with_unlabelled(features: np.ndarray, targets: np.ndarray, unlabelled: np.ndarray | None):
    if unlabelled is None or not len(unlabelled):
        return features, targets
    return (np.concatenate([features, np.asarray(unlabelled, np.float32)]),
            np.concatenate([targets, np.full(len(unlabelled), -1, np.int64)]))


def _head_logits(head, features: np.ndarray, n_classes: int) -> np.ndarray:
    """Log-probabilities (N, n_classes) of a fitted head; classes it never saw get MIN_PROB."""
    proba = head.predict_proba(np.asarray(features, np.float32))
    full = np.full((len(proba), n_classes), MIN_PROB)
    full[:, head.classes_] = np.maximum(proba, MIN_PROB)
    full /= full.sum(1, keepdims=True)
    return np.log(full)
