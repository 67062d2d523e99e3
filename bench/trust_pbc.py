"""Trust on the real PBC images: unknown-cell-type and non-cell OOD detection, selective accuracy.

(a) Left-out class: the default architecture (EfficientNet-Lite0, offline ImageNet weights, 128 px,
    ``hematoscope.train``) is fine-tuned on a stratified subset of PBC *without* one class
    (``--leave-out``). Each OOD scorer is fitted on the training images, thresholded on the
    validation images (95 % of them accepted), then scored on held-out test images of the known
    classes against images of the left-out class: a real "unknown cell type" test.
(b) Non-cell images (``hematoscope.trust.ood_sets``: noise, flat colour, text, fractal textures,
    stripes) against the same PBC test images; corrupted cells (blur, over-exposure, stain shift
    of PBC test images) reported separately.
(c) The shipped default model (when present): accuracy of the most confident 90 % of its own
    validation split, ECE before/after temperature scaling, non-cell AUROC.

Own stratified 80/10/10 split of PBC (``make_split`` seed 0). Model outputs and the trained
bundle are cached under the hematoscope cache dir, so a rerun only redoes the analysis. Usage:

    nice -n 10 .venv/bin/python bench/trust_pbc.py [--leave-out monocyte] [--part a|c|all]

Writes bench/results/trust_pbc.json (one entry per left-out-class run, merged with earlier runs),
trust_pbc_<class>_<n>x<epochs>_scores_<method>.png / _risk_coverage.png, trust_pbc_default_*.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
PBC = Path(os.environ.get("HEMATOSCOPE_PBC", Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"))
SCORERS = ("knn_energy", "mahalanobis", "knn", "energy", "max_softmax")
log = logging.getLogger("trust_pbc")


def outputs_cached(bundle, paths, cache: Path, name: str):
    """Bundle outputs for ``paths`` (readable ones), cached as a plain .npz (no pickle)."""
    from hematoscope.bundle.base import ModelOutput
    from hematoscope.trust import bundle_outputs

    views = bundle.config.tta
    f = cache / (f"{name}.npz" if views == 1 else f"{name}_tta{views}.npz")
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return ModelOutput(z["logits"], z["features"]), z["kept"]
    t0 = time.perf_counter()
    out, kept = bundle_outputs(bundle, list(paths), batch_size=64, description=name)
    np.savez(f, logits=out.logits, features=out.features, kept=kept)
    log.info("%s: %d images in %.0f s", name, len(kept), time.perf_counter() - t0)
    return out, kept


def ood_sets(cache: Path, in_test_paths: list[str], n: int, seed: int) -> dict[str, list[str]]:
    """Generated non-cell images and corrupted copies of in-distribution test images."""
    from hematoscope.trust.ood_sets import CORRUPTIONS, NOT_CELLS, make_ood_set

    sets = {}
    for kind in NOT_CELLS:
        d = cache / "ood" / kind
        if not (d / "ood_manifest.json").exists():
            make_ood_set(kind, d, n=n, seed=seed, size=256)
        sets[kind] = sorted(str(p) for p in d.glob("*.png"))
    src = cache / "ood" / "corruption_source"
    if not src.exists():
        src.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        for p in rng.choice(in_test_paths, size=min(n, len(in_test_paths)), replace=False):
            (src / Path(p).name).symlink_to(p)
    for kind in CORRUPTIONS:
        d = cache / "ood" / kind
        if not (d / "ood_manifest.json").exists():
            make_ood_set(kind, d, n=n, seed=seed, source=src)
        sets[kind] = sorted(str(p) for p in d.glob("*.png"))
    return sets


def score_all(bundle, scorer_names, train, val, named: dict, target_tpr: float = 0.95) -> dict:
    """Fit each scorer (fit_trust) and return its scores on every named output set."""
    from hematoscope.trust import fit_trust

    scores = {}
    for method in scorer_names:
        report = fit_trust(bundle, train=train, val=val, method=method, target_tpr=target_tpr)
        scores[method] = {"threshold": report["ood_threshold"], "report": report,
                          **{k: bundle.ood.score(features=o.features, logits=o.logits) for k, o in named.items()}}
    return scores


def part_a(args, cache_root: Path) -> dict:
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split, save_split
    from hematoscope.trust import ood_metrics, risk_coverage, table_targets
    from hematoscope.trust.calibration import expected_calibration_error, softmax
    from hematoscope.trust.evaluation import plot_risk_coverage, plot_score_histograms
    from hematoscope.trust.ood_sets import CORRUPTIONS, NOT_CELLS

    table = make_split(read_dataset(PBC, reader="pbc"), val=0.1, test=0.1, seed=args.seed)
    table = table[~table["path"].str.contains("/.DS_")].reset_index(drop=True)  # the known unreadable file
    known = table["canonical"] != args.leave_out
    rng = np.random.default_rng(args.seed)
    train_rows = []
    for _, g in table[known & (table["split"] == "train")].groupby("canonical"):
        train_rows += list(rng.choice(g.index, size=min(len(g), args.train_per_class), replace=False))
    val_rows = []
    for _, g in table[known & (table["split"] == "val")].groupby("canonical"):
        val_rows += list(rng.choice(g.index, size=min(len(g), args.val_per_class), replace=False))
    train_rows, val_rows = sorted(train_rows), sorted(val_rows)
    fit_table = table.loc[train_rows + val_rows]
    cache = cache_root / f"leave_out_{args.leave_out}_{args.train_per_class}x{args.epochs}"
    cache.mkdir(parents=True, exist_ok=True)
    run_dir = cache / "run"
    t_train = None
    if not (run_dir / "bundle" / "config.json").exists():
        from hematoscope.train import TrainConfig, train

        split_csv = save_split(fit_table, cache / "fit_split.csv")
        t0 = time.perf_counter()
        result = train(TrainConfig.from_yaml(REPO / "recipes" / "plain.yaml", data=str(split_csv), out=str(run_dir),
                                             epochs=args.epochs, size=128, seed=args.seed, fit_trust=False,
                                             name=f"pbc-without-{args.leave_out}"))
        t_train = time.perf_counter() - t0
        log.info("trained in %.0f s: val %s", t_train, {k: result.metrics.get(k) for k in ("accuracy", "macro_f1")})
    bundle = load_bundle(run_dir / "bundle")
    bundle.set_tta(args.tta)

    test_known = table[known & (table["split"] == "test")]
    left_out = table[~known]
    left_out = left_out.loc[rng.choice(left_out.index, size=min(len(left_out), args.n_left_out), replace=False)]
    train_t, val_t = table.loc[train_rows], table.loc[val_rows]
    outs = {}
    for name, t in (("train", train_t), ("val", val_t), ("test", test_known), ("left_out", left_out)):
        out, kept = outputs_cached(bundle, t["path"], cache, name)
        outs[name] = (out, table_targets(bundle, t)[kept])
    for kind, paths in ood_sets(cache_root, list(test_known["path"]), args.n_ood, args.seed).items():
        outs[kind] = (outputs_cached(bundle, paths, cache, f"ood_{kind}")[0], None)

    named = {k: v[0] for k, v in outs.items() if k not in ("train",)}
    scores = score_all(bundle, SCORERS, outs["train"], outs["val"], named)
    test_out, test_y = outs["test"]
    probs = softmax(test_out.logits)
    correct = probs.argmax(1) == test_y
    not_cell_kinds = list(NOT_CELLS)
    res = {
        "left_out_class": args.leave_out,
        "known_classes": bundle.labels,
        "train_images": int(len(outs["train"][1])), "val_images": int(len(outs["val"][1])),
        "test_known_images": int(len(test_y)), "left_out_images": int(len(outs["left_out"][0].logits)),
        "epochs": args.epochs, "train_seconds": t_train or getattr(bundle.config.training, "train_seconds_this_session", None), "tta_views": args.tta,
        "test_accuracy_known": float(correct.mean()),
        "test_ece_uncalibrated": expected_calibration_error(probs, test_y),
        "scorers": {},
    }
    for method, s in scores.items():
        t = s["threshold"]
        non_cells = np.concatenate([s[k] for k in not_cell_kinds])
        entry = {
            "threshold": t,
            "left_out": ood_metrics(s["test"], s["left_out"]),
            "non_cells": ood_metrics(s["test"], non_cells),
            "non_cells_by_kind": {k: ood_metrics(s["test"], s[k])["auroc"] for k in not_cell_kinds},
            "corrupted_by_kind": {k: ood_metrics(s["test"], s[k]) for k in CORRUPTIONS},
            "flagged_at_threshold": {"test_known": float(np.mean(s["test"] > t)),
                                     "left_out": float(np.mean(s["left_out"] > t)),
                                     "non_cells": float(np.mean(non_cells > t)),
                                     **{k: float(np.mean(s[k] > t)) for k in CORRUPTIONS}},
        }
        res["scorers"][method] = entry
    cal = scores[SCORERS[-1]]["report"]["calibration"]
    res["calibration_val"] = {k: cal[k] for k in ("temperature", "ece_before", "ece_after", "n")}
    res["test_ece_calibrated"] = expected_calibration_error(softmax(test_out.logits, cal["temperature"]), test_y)
    rc = risk_coverage(softmax(test_out.logits, cal["temperature"]).max(1), correct)
    res["test_risk_coverage"] = {k: rc[k] for k in ("aurc", "accuracy_at_coverage")}

    stem = RESULTS / f"trust_pbc_{args.leave_out}_{args.train_per_class}x{args.epochs}{_tta_tag(args)}"
    for method in SCORERS:
        s = scores[method]
        plot_score_histograms(s["test"], {f"left-out {args.leave_out}": s["left_out"],
                                          "non-cells": np.concatenate([s[k] for k in not_cell_kinds]),
                                          "corrupted cells": np.concatenate([s[k] for k in CORRUPTIONS])},
                              f"{stem}_scores_{method}.png", threshold=s["threshold"],
                              title=f"{method} score, model trained without {args.leave_out}")
    plot_risk_coverage({"PBC test, known classes": rc}, f"{stem}_risk_coverage.png")
    return res


def part_c(args, cache_root: Path) -> dict:
    """The shipped default model on its own validation split."""
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.splits import load_split
    from hematoscope.bundle.default import default_bundle_path
    from hematoscope.trust import fit_trust_on_table, ood_metrics, reliability_curve, risk_coverage, table_targets
    from hematoscope.trust.calibration import expected_calibration_error, softmax
    from hematoscope.trust.evaluation import plot_reliability, plot_risk_coverage
    from hematoscope.trust.ood_sets import CORRUPTIONS, NOT_CELLS

    path = default_bundle_path()
    bundle = load_bundle(path)
    shipped_views = bundle.config.tta
    bundle.set_tta(args.tta)
    split_file = Path(args.default_split) if args.default_split else path / "split.csv"
    if not split_file.exists():
        raise SystemExit(f"no split file for the default model at {split_file}; pass --default-split")
    table = load_split(split_file, verify=False)
    cache = cache_root / f"default_model_{bundle.name}"  # outputs of another shipped model must not be reused
    cache.mkdir(parents=True, exist_ok=True)
    fitted_here = False
    if bundle.config.ood is None or args.tta != shipped_views:
        # fit on a copy (the shipped files are not ours to change); views change the scores
        fit_trust_on_table(bundle, table)
        bundle.save(cache / f"bundle_with_trust{_tta_tag(args)}")
        fitted_here = True
    val = table[table["split"] == "val"]
    out, kept = outputs_cached(bundle, val["path"], cache, "val")
    y = table_targets(bundle, val)[kept]
    before, after = softmax(out.logits), softmax(out.logits, bundle.config.temperature)
    correct = after.argmax(1) == y
    rc = risk_coverage(after.max(1), correct)
    pred = bundle.decide(out, [str(i) for i in range(len(y))])
    test = table[table["split"] == "test"]
    test_out, test_kept = outputs_cached(bundle, test["path"], cache, "test")
    test_probs = softmax(test_out.logits, bundle.config.temperature)
    test_y = table_targets(bundle, test)[test_kept]
    test_correct = test_probs.argmax(1) == test_y
    test_rc = risk_coverage(test_probs.max(1), test_correct)
    ood_paths = ood_sets(cache_root, list(val["path"]), args.n_ood, args.seed)
    in_scores = bundle.ood.score(features=out.features, logits=out.logits)
    res = {
        "bundle": path.name, "name": bundle.name, "split_file": split_file.name, "val_images": int(len(y)),
        "ood_fitted_by_this_bench": fitted_here, "ood_config": bundle.config.ood.model_dump(),
        "abstain_threshold": bundle.config.abstain_threshold,
        "val_accuracy": float(correct.mean()),
        "val_accuracy_at_90_coverage": rc["accuracy_at_90_coverage"],
        "val_accuracy_at_coverage": rc["accuracy_at_coverage"], "val_aurc": rc["aurc"],
        "test_images": int(len(test_y)), "test_accuracy": float(test_correct.mean()),
        "test_accuracy_at_coverage": test_rc["accuracy_at_coverage"],
        "val_answered_by_bundle_rules": {"coverage": float(np.mean(~pred.abstain)),
                                         "accuracy": float(correct[~pred.abstain].mean())},
        "temperature": bundle.config.temperature, "tta_views": args.tta,
        "ece_before": expected_calibration_error(before, y), "ece_after": expected_calibration_error(after, y),
        "note": "temperature and OOD threshold were fitted on this same val split",
        "ood": {},
    }
    for kind, paths in ood_paths.items():
        o, _ = outputs_cached(bundle, paths, cache, f"ood_{kind}")
        res["ood"][kind] = ood_metrics(in_scores, bundle.ood.score(features=o.features, logits=o.logits))
    if bundle.reframes:  # it lowers the scores of flagged images: does it let non-cells or damaged cells through?
        rule = bundle.config.reframe
        res["framing_search"] = {**rule.model_dump(), "note": "share flagged by Bundle.predict, whole crops only / "
                                                              "with the framing search / with it and --recolour",
                                 "flagged": {}}
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from crosslab import framing_rule

        settings = [("whole_crop", None, None), ("framing_search", rule, None), ("recolour", rule.with_colours(), None)]
        if args.ood_accept is not None:  # the flag moved after fitting (`predict --ood-accept`)
            res["framing_search"]["note"] += f"; *_ood_accept: the flag moved to accept {args.ood_accept:g}"
            settings += [(f"{name}_ood_accept", r, args.ood_accept) for name, r, _ in settings[1:]]
        for kind, paths in {"val (PBC)": list(val["path"]), **ood_paths}.items():
            flagged = {}
            for name, r, accept in settings:
                bundle.set_ood_accept(accept)
                with framing_rule(bundle, r):
                    flagged[name] = round(float(np.mean(bundle.predict(paths).ood_flag)), 4)
            bundle.set_ood_accept(None)
            res["framing_search"]["flagged"][kind] = flagged
    nc = [res["ood"][k]["auroc"] for k in NOT_CELLS]
    res["non_cells_min_auroc"] = min(nc)
    res["corrupted_auroc"] = {k: res["ood"][k]["auroc"] for k in CORRUPTIONS}
    stem = RESULTS / f"trust_pbc_default{_tta_tag(args)}"
    plot_risk_coverage({"default model, PBC val": rc}, f"{stem}_risk_coverage.png")
    plot_reliability({"before (T=1)": reliability_curve(before, y),
                      f"after (T={bundle.config.temperature:.2f})": reliability_curve(after, y)},
                     f"{stem}_reliability.png")
    return res


def part_card(args) -> dict:
    """Copy the measured trust numbers into the shipped default model's metrics (its model card
    shows them): own-val selective accuracy and OOD AUROCs with its shipped view count, and the
    left-out-class AUROC of a model trained with the same recipe without one class."""
    from hematoscope.bundle.base import load_bundle
    from hematoscope.bundle.default import default_bundle_path

    results = json.loads((RESULTS / "trust_pbc.json").read_text())
    path = default_bundle_path()
    bundle = load_bundle(path)
    views = bundle.config.tta
    own = results["default_model" + ("" if views == 1 else f"_tta{views}")]
    if own["ood_config"]["method"] != bundle.config.ood.method or own["temperature"] != bundle.config.temperature:
        raise SystemExit("trust_pbc.json does not describe the shipped bundle's trust settings; rerun --part c")
    left_key = _left_out_key(args, views)
    left = results["left_out_class"][left_key]["scorers"][bundle.config.ood.method]
    card = {
        "val_accuracy_at_90_coverage": own["val_accuracy_at_90_coverage"],
        "test_accuracy_at_90_coverage": own["test_accuracy_at_coverage"]["0.9"],
        "ood_auroc_non_cells_min": own["non_cells_min_auroc"],
        "ood_auroc_corrupted_min": min(own["corrupted_auroc"].values()),
        f"ood_auroc_unknown_cell_type_{args.leave_out}": left["left_out"]["auroc"],
        "trust_note": f"bench/trust_pbc.py with {views} views; the unknown-cell-type AUROC is of a model "
                      f"trained by the same recipe without {args.leave_out} ({left_key})",
    }
    bundle.metrics.update(card)
    bundle.save(path)  # only config, metrics and card change
    return card


def _left_out_key(args, views: int) -> str:
    """The trust_pbc.json key of a left-out-class run."""
    return f"{args.leave_out}, {args.train_per_class}/class, {args.epochs} epochs" + (
        f", {views} test-time views" if views > 1 else "")


def _tta_tag(args) -> str:
    return "" if args.tta == 1 else f"_tta{args.tta}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("a", "c", "all", "card"), default="all",
                    help="card: write the measured numbers into the shipped default model's metrics")
    ap.add_argument("--leave-out", default="monocyte", help="canonical class left out of training in (a)")
    ap.add_argument("--train-per-class", type=int, default=250, help="training images per known class")
    ap.add_argument("--val-per-class", type=int, default=80, help="validation images per known class")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-left-out", type=int, default=600)
    ap.add_argument("--n-ood", type=int, default=100, help="images per OOD kind")
    ap.add_argument("--default-split", default=None, help="split CSV of the default model (default: BUNDLE/split.csv)")
    ap.add_argument("--tta", type=int, default=1, help="flip/rot90 views averaged per image (1, 2, 4, 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ood-accept", type=float, help="(c) also measure what the flag moved to accept this share of "
                    "the validation cells lets through")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    # One thread: on a shared, overloaded CPU a second OpenMP thread mostly waits for the first.
    torch.set_num_threads(args.threads)
    from hematoscope import _io
    from hematoscope.paths import cache_dir

    cache_root = cache_dir("bench", "trust_pbc")
    out_file = RESULTS / "trust_pbc.json"

    def merge(update) -> dict:
        """Re-read the file right before writing: runs of this script may overlap."""
        results = json.loads(out_file.read_text()) if out_file.exists() else {}
        results.update({"dataset": "PBC (Acevedo 2020), ../shared/data/pbc",
                        "split": f"own stratified 80/10/10, make_split seed {args.seed}",
                        "machine": "2 CPU cores (shared with other jobs for the older entries)"})
        update(results)
        _io.write_json(out_file, results)
        return results

    if args.part == "card":
        print(json.dumps(part_card(args), indent=1))
        return
    results = {}
    if args.part in ("a", "all"):
        key = _left_out_key(args, args.tta)
        entry = part_a(args, cache_root)
        results = merge(lambda r: r.setdefault("left_out_class", {}).__setitem__(key, entry))
    if args.part in ("c", "all"):
        try:
            entry = part_c(args, cache_root)
            results = merge(lambda r: r.__setitem__("default_model" + _tta_tag(args), entry))
        except (FileNotFoundError, ValueError) as exc:
            log.warning("default model not evaluated: %s", exc)
    print(json.dumps(results, indent=1)[:6000])


if __name__ == "__main__":
    main()
