"""Classical pipeline on the real PBC images: named features → XGBoost, held-out test scores.

Own stratified split of PBC (``hematoscope.data.splits.make_split``, 80/10/10, seed 0; the one
unreadable file is dropped): train rows train, val rows stop early and fit the anomaly threshold,
test rows are scored once. Features are cached on disk, so a rerun skips extraction. Usage:

    nice -n 10 .venv/bin/python bench/classical_pbc.py [--bundle-out DIR] [--jobs 2]

Writes bench/results/classical_pbc.json, classical_pbc_confusion.png and
classical_pbc_importance.png.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PBC = Path(os.environ.get("HEMATOSCOPE_PBC", Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2, help="feature-extraction processes")
    ap.add_argument("--threads", type=int, default=1,
                    help="XGBoost threads (1: OpenMP threads stall badly on a loaded, shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle-out", type=Path, default=None, help="also save the trained bundle here")
    ap.add_argument("--evaluate", action="store_true",
                    help="also score the bundle through the evaluate path (Bundle.predict) on val and test")
    ap.add_argument("--fraction", type=float, default=1.0,
                    help="use this stratified random fraction of every split part (1 = all of PBC)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    from hematoscope import _io
    from hematoscope.classical.features import FEATURE_NAMES, FEATURE_VERSION, ClassicalFeatures
    from hematoscope.classical.model import train_classical
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split
    from hematoscope.explain.shap import importance_png

    table = make_split(read_dataset(PBC, reader="pbc"), val=0.1, test=0.1, seed=args.seed)
    # Extract in random order so that an interrupted run leaves a random, stratified subset cached.
    order = np.random.default_rng(args.seed).permutation(len(table))
    ClassicalFeatures(n_jobs=args.jobs, on_error="nan", progress=True).transform(table["path"].iloc[order].tolist())
    if args.fraction < 1:
        table = (table.groupby(["split", "canonical"], group_keys=False)
                 .sample(frac=args.fraction, random_state=args.seed).sort_values("path").reset_index(drop=True))
    result = train_classical(table, seed=args.seed, n_jobs=args.jobs, name="classical-pbc", progress=True,
                             params={"nthread": args.threads})
    bundle, report = result.bundle, result.report

    test = table[table["split"] == "test"]
    t0 = time.perf_counter()
    x = ClassicalFeatures(n_jobs=args.jobs, on_error="nan").transform(test["path"].tolist())
    readable = ~np.isnan(x[:, FEATURE_NAMES.index("seg_ok")])
    x = x[readable]
    y = np.array([bundle.labels.index(c) for c in test["canonical"][readable]])
    logits = bundle.logits_of(x)
    t_predict = time.perf_counter() - t0
    pred = logits.argmax(1)
    ood_flag = bundle.ood.score(features=x, logits=logits) > bundle.config.ood.threshold

    out = {
        "dataset": "PBC (Acevedo 2020), shared copy (../shared/data/pbc)",
        "split": "own stratified 80/10/10, hematoscope.data.splits.make_split seed %d" % args.seed,
        "fraction_used": args.fraction,
        "feature_version": FEATURE_VERSION,
        "n_features": len(FEATURE_NAMES),
        "n_train": report["n_train"], "n_val": report["n_val"], "n_test": int(len(y)),
        "unreadable_dropped": report["unreadable"] + int((~readable).sum()),
        "test": {
            "accuracy": float(accuracy_score(y, pred)),
            "f1_weighted": float(f1_score(y, pred, average="weighted")),
            "f1_macro": float(f1_score(y, pred, average="macro")),
            "per_class": classification_report(y, pred, target_names=bundle.labels, output_dict=True),
            "anomaly_flag_rate": float(ood_flag.mean()),
            "segmentation_failed_rate": float((x[:, FEATURE_NAMES.index("seg_ok")] == 0).mean()),
        },
        "val": report["val"],
        "seconds": {"feature_extraction_train_val": round(report["feature_seconds"], 1),
                    "xgboost_training": round(report["train_seconds"], 1),
                    "test_features_and_predict": round(t_predict, 1)},
        "xgboost_rounds": report["rounds"],
        "trust": report["trust"],
        "machine": f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end",
        "xgboost_threads": args.threads,
    }
    if args.evaluate:
        # The same bundle through `hematoscope evaluate`'s path (Bundle.predict: one decode path,
        # features computed by the bundle, its own trust), on the rows it was scored on above.
        from hematoscope.evaluate import evaluate_bundle

        out["through_evaluate"] = {}
        for part in ("val", "test"):
            t0 = time.perf_counter()
            ev = evaluate_bundle(bundle, table[table["split"] == part].reset_index(drop=True))
            out["through_evaluate"][part] = {
                "n": ev["n"], "accuracy": ev["accuracy"], "f1_weighted": (sum(d["f1"] * d["support"] for d in ev["per_class"].values())
                                                / sum(d["support"] for d in ev["per_class"].values())),
                "macro_f1": ev["macro_f1"], "abstained": ev["abstained"],
                "accuracy_answered": ev["accuracy_answered"], "seconds": round(time.perf_counter() - t0, 1)}
            print(f"through evaluate, {part}: {out['through_evaluate'][part]}")
        out["through_evaluate"]["val_minus_training_val_points"] = round(
            100 * (out["through_evaluate"]["val"]["accuracy"] - report["val"]["accuracy"]), 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    _io.write_json(RESULTS / "classical_pbc.json", out)
    _io.write_bytes(RESULTS / "classical_pbc_confusion.png", _confusion_png(confusion_matrix(y, pred), bundle.labels))
    _io.write_bytes(RESULTS / "classical_pbc_importance.png", importance_png(bundle, top=25))
    if args.bundle_out:
        bundle.save(args.bundle_out)
    t = out["test"]
    print(f"test: accuracy {t['accuracy']:.4f}  weighted F1 {t['f1_weighted']:.4f}  macro F1 {t['f1_macro']:.4f}")
    print(f"seconds: {out['seconds']}")


def _confusion_png(cm: np.ndarray, labels: list[str]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(cm / cm.sum(1, keepdims=True), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > cm[i].sum() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Classical pipeline, PBC own test split")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    main()
