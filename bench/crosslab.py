"""Cross-lab benchmark: a PBC-trained bundle on another lab's white cells (LISC, Tehran), used
the three ways a lab can use hematoscope on its own microscope, with PBC's own test split beside.

    python bench/crosslab.py                       # the shipped default model
    python bench/crosslab.py --bundle DIR --key v0  # another bundle, stored under its own key
    python bench/crosslab.py --table                # the markdown table of every stored entry

LISC crops of one cell share a group (groups.csv): the crops are split by group into an
"own-lab" half (the lab's unlabelled crops for `adapt`, and the pool few labels are drawn from)
and a test half; nothing of a test cell is ever adapted on or labelled.

1. as is (zero-shot): the bundle on the test half (and on all of LISC);
2. after `adapt` on ADAPT_IMAGES unlabelled crops of the own-lab half (BatchNorm statistics +
   OOD reference refitted); timed;
2b. after `adapt --tune --classes <LISC's 5>` on the same crops (the network also tuned on them
   without labels, TUNE_EPOCHS epochs, towards the class mix estimated from them; entries before
   2026-11-30 tuned towards equal shares and record no ``class_mix``; it then answers among
   those classes); timed;
3. few labels: the `fewshot bench` protocol with `fewshot fit`'s default head (svm+self) and lr:
   k = 1, 5, 10, 20 labelled cells per class (k different groups, one crop each) from the
   own-lab half, the rest of that half as unlabelled images for self-training, REPEATS draws;
   features of the adapted model, of the adapted + tuned one (2b), of the model as is (all
   `--views` views, default 8) and of `fewshot fit`'s default timm backbone (the shipped SimCLR
   Lite0); `--few-labels` picks which to run and keeps the stored results of the others.

4. a lab that crops tighter than PBC, simulated on PBC's own test cells cut to their centre 50 %
   and 40 %: as is, `predict --framing auto`, `adapt --framing keep` and `adapt` (which chooses
   the lab's framing).

Macro-F1 is over LISC's 5 classes; a prediction of a class LISC lacks (e.g. immature
granulocyte) counts as an error. "5-part" repeats 1 and 2 with answers restricted to LISC's
classes (`predict --classes`, `Bundle.restrict_classes`), as a lab doing a white-cell
differential would run it. Abstained cells are scored by their top-1 like the others and
the abstain rate is reported beside. Results merge into bench/results/crosslab.json under --key.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "crosslab.json"
CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def read_lisc(root: Path):
    """LISC as a samples table with the cell group in ``patient`` (the ``lisc`` reader)."""
    from hematoscope.data.readers import read_dataset

    return read_dataset(root, reader="lisc")


def score(y_true: list[str], pred, *, n: int | None = None) -> dict:
    """Macro-F1 / accuracy over the target's classes, and the abstain rates."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    y_pred = [pred.labels[i] for i in pred.probs.argmax(1)]
    abstain = np.asarray(pred.abstain, bool)
    flagged = np.asarray(pred.ood_flag, bool)
    correct = np.array(y_pred) == np.array(y_true)
    return {
        "n": len(y_true),
        "macro_f1": round(float(f1_score(y_true, y_pred, labels=CLASSES, average="macro", zero_division=0)), 4),
        "accuracy": round(float(correct.mean()), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(y_true, y_pred)), 4),
        "abstained": round(float(abstain.mean()), 4),
        "flagged_unlike_training": round(float(flagged.mean()), 4),
        "accuracy_answered": round(float(correct[~abstain].mean()), 4) if (~abstain).any() else None,
        "predicted_other_classes": round(float(np.mean([p not in CLASSES for p in y_pred])), 4),
        **search_shares(pred),
    }


def search_shares(pred) -> dict:
    """Shares of ``pred`` answered from another framing / with a colour change, where recorded."""
    return {**({"reframed": round(float(np.mean(pred.framing != 1)), 4)} if pred.framing is not None else {}),
            **({"recoloured": round(float(np.mean(pred.recolour != "")), 4)} if pred.recolour is not None else {})}


def few_labels(extractor, table, own, test, shots, repeats: int, seed: int, heads) -> dict:
    """The `fewshot bench` protocol on a lab's own half: k labelled cells per class (k different
    groups, one crop each) drawn from the own-lab half, the rest of it as unlabelled images for
    self-training heads, scored on the test half; macro-F1 over LISC's classes."""
    from hematoscope.fewshot.bench import run_benchmark

    res = run_benchmark(table[own].reset_index(drop=True), extractor, test=table[test].reset_index(drop=True),
                        shots=shots, heads=heads, repeats=repeats, seed=seed, max_pool_per_class=None,
                        group_by="patient", progress=False)
    out = {"features": extractor.describe(), "views": res["views"], "extract_seconds": res["extract_seconds"],
           "n_test": res["n_test"], "heads": {}}
    for row in res["results"]:
        out["heads"].setdefault(row["head"], {})[str(row["shots"])] = {
            "macro_f1_mean": round(row["macro_f1_mean"], 4), "macro_f1_sd": round(row["macro_f1_sd"], 4),
            "balanced_accuracy_mean": round(row["balanced_accuracy_mean"], 4),
            "fit_seconds": round(row["fit_seconds_mean"], 2), "draws": repeats}
    return out


@contextlib.contextmanager
def framing_rule(bundle, rule):
    """``bundle`` answers with the framing-search ``rule`` (None: whole crops) inside the block."""
    kept = bundle.config.reframe
    bundle.config.reframe = rule
    try:
        yield
    finally:
        bundle.config.reframe = kept


def centre_crops_only(rule):
    """The framing-search ``rule`` without its size padding."""
    return rule.model_copy(update={"size_ref": None})


def lisc_cut(bundle, paths: list[str], truth: list[str]) -> dict:
    """LISC crops cut to their centre 60 % / 50 % (another lab's stain, framed tight), as is
    with the shipped framing search and with its centre crops only (no size padding)."""
    from hematoscope.data.images import load_model_image
    from hematoscope.models.preprocess import centre_crop

    cells = [load_model_image(p, bundle.preprocess) for p in paths]
    out = {}
    for share in (0.6, 0.5):
        cut = [centre_crop(c, share) for c in cells]
        entry = {"as_is": score(truth, bundle.predict(cut))}
        with framing_rule(bundle, centre_crops_only(bundle.config.reframe)):
            entry["centre_crops_only"] = score(truth, bundle.predict(cut))
        out[f"centre_{share:g}"] = entry
        logging.info("LISC cut to %g: %s", share, {k: v["macro_f1"] for k, v in entry.items()})
    return out


def tight_framing(bundle, pbc, n_adapt: int, seed: int) -> dict:
    """A lab that crops tight around each cell, simulated on PBC's test cells cut to their centre
    50 % / 40 % / 30 % (the cell then fills most of the frame, as in the tight crops of other labs):
    accuracy as is, with `predict --framing auto` (one framing chosen on the scored cells
    themselves), after `adapt --framing keep` and after `adapt` (framing chosen), adapting on
    ``n_adapt`` cells and scoring the others."""
    from hematoscope.bundle.adapt import adapt_bundle, choose_framing
    from hematoscope.data.images import load_model_image
    from hematoscope.models.preprocess import centre_crop

    order = np.random.default_rng(seed).permutation(len(pbc))
    own, rest = order[:n_adapt], order[n_adapt:]
    cells = [load_model_image(p, bundle.preprocess) for p in pbc["path"]]
    truth = np.array(pbc["canonical"])[rest]
    out = {"cells": f"PBC test split, {n_adapt} to adapt on, {len(rest)} scored"}

    def scored(b, images) -> dict:
        pred = b.predict(images)
        return {"accuracy": round(float(np.mean(np.array(pred.predicted) == truth)), 4),
                "abstained": round(float(np.mean(pred.abstain)), 4)}

    for share in (0.5, 0.4, 0.3):
        lab_own = [centre_crop(cells[i], share) for i in own]
        lab_rest = [centre_crop(cells[i], share) for i in rest]
        kept, _ = adapt_bundle(bundle, lab_own, source=f"PBC centre {share:.0%}", framing=None)
        framed, _ = adapt_bundle(bundle, lab_own, source=f"PBC centre {share:.0%}")
        as_is = scored(bundle, lab_rest)
        rule = bundle.config.reframe
        if rule is not None and rule.size_ref is not None:  # the search with centre crops only
            with framing_rule(bundle, centre_crops_only(rule)):
                as_is["centre_crops_only"] = scored(bundle, lab_rest)
        own_framing = bundle.preprocess.framing
        step = max(1, len(lab_rest) // n_adapt)  # `predict --framing auto` looks at up to 300 of the run's cells
        run_framing = choose_framing(bundle, lab_rest[::step][:n_adapt], batch_size=64)["framing"]
        bundle.set_framing(run_framing)
        try:
            framing_auto = {**scored(bundle, lab_rest), "framing": run_framing}
        finally:
            bundle.set_framing(own_framing)
        out[f"centre_{share:g}"] = {"as_is": as_is, "predict_framing_auto": framing_auto,
                                    "adapted_framing_kept": scored(kept, lab_rest),
                                    "adapted": {**scored(framed, lab_rest), "framing": framed.preprocess.framing}}
        logging.info("tight framing %g: %s", share, out[f"centre_{share:g}"])
    return out


def markdown_table(results: dict) -> str:
    """The README / docs tables of every entry in crosslab.json."""
    def shots(f: dict) -> list[str]:
        return [f"{f[k]['macro_f1_mean']:.3f} ± {f[k]['macro_f1_sd']:.3f}" if k in f else "—"
                for k in ("1", "5", "10", "20")]

    rows = ["| model | LISC as is | abstained | after `adapt` | abstained | 5-part (`--classes`): as is / adapted "
            "| after `adapt --tune --classes` | abstained | PBC test accuracy / macro-F1 |",
            "|---|---|---|---|---|---|---|---|---|"]
    few = ["| model | features | head | 1 cell/class | 5 | 10 | 20 |", "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        z, a, pbc = r["zero_shot"]["test_half"], r["adapted"]["test_half"], r.get("pbc_test")
        five = (f"{r['zero_shot']['test_half_5part']['macro_f1']:.3f} / "
                f"{r['adapted']['test_half_5part']['macro_f1']:.3f}" if "test_half_5part" in r["zero_shot"] else "—")
        t = r.get("adapted_tuned", {}).get("test_half")
        tuned = f"{t['macro_f1']:.3f} | {t['abstained']:.0%}" if t else "— | —"
        whole = r["zero_shot"].get("test_half_whole_crop")
        as_is = f"{z['macro_f1']:.3f}" + (f" (whole crops: {whole['macro_f1']:.3f})" if whole else "")
        rows.append(f"| {key} | {as_is} | {z['abstained']:.0%} | {a['macro_f1']:.3f} | "
                    f"{a['abstained']:.0%} | {five} | {tuned} | "
                    + (f"{pbc['accuracy']:.2%} / {pbc['macro_f1']:.3f} |" if pbc else "— |"))
        if "few_labels" in r:
            for name, f in r["few_labels"].items():
                for head, by_shots in f["heads"].items():
                    few.append(f"| {key} | {name}, {f['views']} views | {head} | " + " | ".join(shots(by_shots)) + " |")
        elif "few_labels_adapted" in r:  # entries of 2026-11-29 and before: a logistic-regression head, 1 view
            few.append(f"| {key} | adapted model, 1 view | lr | " + " | ".join(shots(r["few_labels_adapted"])) + " |")
            if "few_labels_fewshot_default" in r:
                f = r["few_labels_fewshot_default"]
                few.append(f"| {key} | {f['backbone']} | lr | " + " | ".join(shots(f)) + " |")
    return ("\n".join(rows) + "\n\nFew labels (macro-F1 on the test half, mean ± sd over 5 draws):\n\n"
            + "\n".join(few))


def main() -> None:
    if sys.argv[1:] == ["--table"]:
        print(markdown_table(json.loads(RESULTS.read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="default", help="bundle directory, or 'default' (the shipped model)")
    ap.add_argument("--key", help="name of this entry in the JSON (default: the bundle's name)")
    ap.add_argument("--lisc", type=Path, default=REPO.parent / "shared" / "data" / "lisc")
    ap.add_argument("--pbc-split", type=Path, default=REPO.parent / "runs" / "pbc-lite0-crosslab-split.csv",
                    help="split file of bench/train_pbc.py (its test rows are scored); skipped when absent")
    ap.add_argument("--adapt-images", type=int, default=300)
    ap.add_argument("--tune-epochs", type=int, default=8, help="`adapt --tune` epochs (0 = skip that part)")
    ap.add_argument("--few-labels", default="all", help="few-label backbones to run: all, none, or names "
                    "(e.g. 'adapted + tuned model'); the stored results of the others are kept")
    ap.add_argument("--shots", default="1,5,10,20")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tta", type=int, help="test-time views (default: the bundle's own)")
    ap.add_argument("--ood-accept", type=float, help="move the OOD flag to accept this share of the bundle's "
                    "validation cells (`predict --ood-accept`; adapt sets its own threshold)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", default="svm+self,lr", help="few-label heads (`fewshot bench --heads`)")
    ap.add_argument("--views", type=int, default=8, help="views per image of the few-label features")
    ap.add_argument("--fewshot-backbone", default="efficientnet_lite0",
                    help="also draw few labels on these timm features ('' = skip)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    import torch

    from hematoscope import load_bundle
    from hematoscope._io import file_sha256
    from hematoscope.bundle.adapt import adapt_bundle, content_hash
    from hematoscope.data.splits import make_split
    from hematoscope.bundle.default import default_bundle_path

    bundle = load_bundle(default_bundle_path() if args.bundle == "default" else args.bundle)
    if args.tta:
        bundle.set_tta(args.tta)
    if args.ood_accept is not None:
        bundle.set_ood_accept(args.ood_accept)
    key = args.key or bundle.name
    table = make_split(read_lisc(args.lisc), val=0.0, test=0.5, seed=args.seed, group_by="patient")
    table = table.reset_index(drop=True)
    paths = [str(p) for p in table["path"]]
    y = list(table["canonical"])
    own, test = (table["split"] == "train").to_numpy(), (table["split"] == "test").to_numpy()
    logging.info("LISC: %d crops, %d groups; own-lab half %d, test half %d", len(table), table["patient"].nunique(),
                 own.sum(), test.sum())
    result = {"bundle": bundle.name, "tta": bundle.config.tta,
              **({"ood_accept": args.ood_accept} if args.ood_accept is not None else {}),
              "lisc": {"name": "LISC (Rezatofighi 2011) white-cell crops", "images": len(table),
                       "groups": int(table["patient"].nunique()), "sha256": content_hash(file_sha256(p) for p in paths),
                       "split": f"make_split(test=0.5, group_by=patient, seed={args.seed})",
                       "own_lab_half": int(own.sum()), "test_half": int(test.sum())}}

    def run(b, idx):
        return score([y[i] for i in np.flatnonzero(idx)], b.predict([paths[i] for i in np.flatnonzero(idx)]))

    def run_5part(b, idx):  # answers restricted to LISC's classes, as a lab doing a 5-part differential would
        b.restrict_classes(CLASSES)
        try:
            return run(b, idx)
        finally:
            b.restrict_classes(None)

    result["zero_shot"] = {"test_half": run(bundle, test), "all": run(bundle, np.ones(len(y), bool)),
                           "test_half_5part": run_5part(bundle, test)}
    logging.info("zero-shot: %s", result["zero_shot"]["test_half"])
    if bundle.reframes:  # the same without the framing search (`predict --no-reframe`)
        rule = bundle.config.reframe
        result["framing_search"] = rule.model_dump()
        with framing_rule(bundle, None):
            result["zero_shot"]["test_half_whole_crop"] = run(bundle, test)
            result["zero_shot"]["test_half_5part_whole_crop"] = run_5part(bundle, test)
        logging.info("zero-shot, whole crops only: %s", result["zero_shot"]["test_half_whole_crop"])
        with framing_rule(bundle, rule.with_colours()):  # `predict --recolour`
            zs = result["zero_shot"]
            zs["test_half_recolour"], zs["own_half_recolour"] = run(bundle, test), run(bundle, own)
            zs["test_half_5part_recolour"] = run_5part(bundle, test)
        zs["own_half"] = run(bundle, own)  # the half the colour changes were chosen on, without them
        logging.info("zero-shot, --recolour: %s", result["zero_shot"]["test_half_recolour"])
        if rule.size_ref is not None:  # another lab's stain, cut tight: does the size padding hold there?
            result["zero_shot"]["test_half_cut"] = lisc_cut(bundle, [paths[i] for i in np.flatnonzero(test)],
                                                            [y[i] for i in np.flatnonzero(test)])

    rng = np.random.default_rng(args.seed)
    adapt_rows = rng.permutation(np.flatnonzero(own))[:args.adapt_images]
    start = time.perf_counter()
    adapted, report = adapt_bundle(bundle, [paths[i] for i in adapt_rows], source="LISC own-lab half")
    adapt_seconds = time.perf_counter() - start
    result["adapted"] = {"images": report.images, "seconds": round(adapt_seconds, 1),
                         "accepted_before": report.accepted_before, "framing": report.framing or None,
                         "test_half": run(adapted, test), "test_half_5part": run_5part(adapted, test)}
    logging.info("adapted (%.0f s): %s", adapt_seconds, result["adapted"]["test_half"])
    if report.framing:  # the same without choosing the lab's framing (`adapt --framing keep`)
        kept, _ = adapt_bundle(bundle, [paths[i] for i in adapt_rows], source="LISC own-lab half", framing=None)
        result["adapted"]["test_half_framing_kept"] = run(kept, test)
    if args.tune_epochs:  # `adapt --tune --classes <LISC's 5>`: answers among them by default
        start = time.perf_counter()
        tuned, report = adapt_bundle(bundle, [paths[i] for i in adapt_rows], source="LISC own-lab half",
                                     classes=CLASSES, tune_epochs=args.tune_epochs)
        result["adapted_tuned"] = {"images": report.images, "seconds": round(time.perf_counter() - start, 1),
                                   "epochs": args.tune_epochs, "classes": CLASSES,
                                   "class_mix": report.tuning["class_mix"], "framing": tuned.preprocess.framing,
                                   "loss_by_epoch": report.tuning["loss_by_epoch"], "test_half": run(tuned, test)}
        logging.info("adapted + tuned: %s", result["adapted_tuned"])

    from hematoscope.fewshot.features import load_extractor

    shots, heads = [int(k) for k in args.shots.split(",")], args.heads.split(",")
    backbones = {"adapted model": lambda: load_extractor(bundle=adapted, tta=args.views),
                 "model as is": lambda: load_extractor(bundle=bundle, tta=args.views)}
    if args.tune_epochs:
        backbones["adapted + tuned model"] = lambda: load_extractor(bundle=tuned, tta=args.views)
    if args.fewshot_backbone:  # `fewshot fit`'s own default features (the shipped SimCLR Lite0)
        label = ("SimCLR Lite0 (`fewshot fit` default)" if args.fewshot_backbone == "efficientnet_lite0"
                 else args.fewshot_backbone)
        backbones[label] = lambda: load_extractor(args.fewshot_backbone, tta=args.views)
    wanted = (set() if args.few_labels == "none" else set(backbones) if args.few_labels == "all"
              else set(args.few_labels.split(",")))
    if wanted - set(backbones):
        raise SystemExit(f"--few-labels: unknown backbones {sorted(wanted - set(backbones))}; known: {sorted(backbones)}")
    stored = json.loads(RESULTS.read_text()).get(key, {}) if RESULTS.is_file() else {}
    result["few_labels"] = dict(stored.get("few_labels", {}))  # backbones not run this time are kept
    for name, make in backbones.items():
        if name not in wanted:
            continue
        result["few_labels"][name] = few_labels(make(), table, own, test, shots, args.repeats, args.seed, heads)
        logging.info("few labels, %s: %s", name, result["few_labels"][name]["heads"])

    if args.pbc_split.is_file():
        from hematoscope.data.splits import load_split

        pbc = load_split(args.pbc_split)
        pbc = pbc[pbc["split"] == "test"].reset_index(drop=True)
        from sklearn.metrics import f1_score

        truth = list(pbc["canonical"])

        def pbc_score(b) -> dict:
            pred = b.predict(list(pbc["path"]))
            y_pred = [pred.labels[i] for i in pred.probs.argmax(1)]
            return {"n": len(truth), "split_file": args.pbc_split.name,
                    "accuracy": round(float(np.mean(np.array(y_pred) == np.array(truth))), 4),
                    "macro_f1": round(float(f1_score(truth, y_pred, average="macro")), 4),
                    "abstained": round(float(np.mean(pred.abstain)), 4),
                    **search_shares(pred)}

        result["pbc_test"] = pbc_score(bundle)
        if bundle.reframes:
            with framing_rule(bundle, None):
                result["pbc_test_whole_crop"] = pbc_score(bundle)
            with framing_rule(bundle, bundle.config.reframe.with_colours()):
                result["pbc_test_recolour"] = pbc_score(bundle)
        logging.info("PBC test: %s", result["pbc_test"])
        result["tight_framing"] = tight_framing(bundle, pbc, args.adapt_images, args.seed)
    result["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads"

    from hematoscope import _io

    merged = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    merged[key] = {**merged.get(key, {}), **result}
    _io.write_text(RESULTS, json.dumps(merged, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
