"""`adapt --tune` on a lab whose crops follow a real white-cell differential, not LISC's even mix.

    python bench/lab_mix.py            # -> bench/results/lab_mix.json; about 20 min on 2 cores

SHOT's diversity term holds the mean answer over a lab's crops to equal shares of its classes.
LISC is curated to about equal shares (23 / 17 / 16 / 22 / 21 % basophils / eosinophils /
lymphocytes / monocytes / neutrophils), so that suited it; a lab's own unlabelled crops follow
its patients' differential, mostly neutrophils and lymphocytes. `adapt --tune` now holds the mean
answer to the lab's class mix estimated from the crops (`--class-mix estimated`, EM under label
shift); this measures both targets on two labs drawn from LISC's own-lab half (split by cell,
as in crosslab.py), scored on the test half:

- even: 300 random crops of the own-lab half;
- differential: 212 crops in a normal adult differential (DIFFERENTIAL: 57 % neutrophils, 31 %
  lymphocytes, 7 % monocytes, 4 % eosinophils, 2 % basophils).

For each: `adapt` alone; `adapt --tune --classes <5>` with `--class-mix uniform` and with
`estimated`; `adapt --tune` without `--classes` (estimated; answers over all 8 classes); tuning
seeds 0-2. Scores: macro-F1 over LISC's 5 classes on the test half; for the differential lab also
the test half weighted to its differential (each crop weighted by its class's share over the
class's test count): macro-F1 and accuracy, the accuracy of the lab's count.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crosslab import CLASSES, REPO, read_lisc  # noqa: E402

RESULTS = REPO / "bench" / "results" / "lab_mix.json"
DIFFERENTIAL = {"neutrophil": 120, "lymphocyte": 65, "monocyte": 15, "eosinophil": 8, "basophil": 4}
#: (name, classes given, class mix) of each tuned variant.
VARIANTS = (("tune 5 classes, uniform", CLASSES, "uniform"), ("tune 5 classes, estimated", CLASSES, "estimated"),
            ("tune all classes, estimated", None, "estimated"))


def scores(truth: np.ndarray, pred: np.ndarray, abstain: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    weight = np.array([DIFFERENTIAL[c] / np.sum(truth == c) for c in truth])
    return {"macro_f1": round(float(f1_score(truth, pred, labels=CLASSES, average="macro", zero_division=0)), 4),
            "differential_macro_f1": round(float(f1_score(truth, pred, labels=CLASSES, average="macro",
                                                          sample_weight=weight, zero_division=0)), 4),
            "differential_accuracy": round(float(np.sum(weight * (pred == truth)) / weight.sum()), 4),
            "abstained": round(float(abstain.mean()), 4)}


def summary(runs: list[dict]) -> dict:
    return {k: f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs], ddof=1):.3f}"
            for k in runs[0] if k not in ("seed", "seconds", "class_mix")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="default")
    ap.add_argument("--lisc", type=Path, default=REPO.parent / "shared" / "data" / "lisc")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    import pandas as pd

    from hematoscope import load_bundle
    from hematoscope._io import file_sha256, write_json
    from hematoscope.bundle.adapt import adapt_bundle, content_hash
    from hematoscope.data.splits import make_split

    bundle = load_bundle(args.bundle)
    table = make_split(read_lisc(args.lisc), val=0.0, test=0.5, seed=0, group_by="patient").reset_index(drop=True)
    own, test = table[table["split"] == "train"], table[table["split"] == "test"]
    truth = test["canonical"].to_numpy()
    labs = {"even": own.sample(300, random_state=0),
            "differential": pd.concat([own[own["canonical"] == c].sample(n, random_state=0)
                                       for c, n in DIFFERENTIAL.items()])}
    result = {"bundle": bundle.name, "epochs": args.epochs, "differential": DIFFERENTIAL,
              "lisc": {"images": len(table), "sha256": content_hash(file_sha256(p) for p in table["path"]),
                       "split": "make_split(test=0.5, group_by=patient, seed=0)", "test_half": len(test)},
              "machine": f"{platform.machine()}, {platform.system()}", "labs": {}}
    for lab, rows in labs.items():
        images = list(rows["path"])
        out = result["labs"][lab] = {"images": len(images),
                                     "mix": {c: int(n) for c, n in rows["canonical"].value_counts().items()}}

        def run(**kw) -> dict:
            start = time.perf_counter()
            adapted, report = adapt_bundle(bundle, images, source=f"LISC own-lab half, {lab}", **kw)
            seconds = time.perf_counter() - start
            pred = adapted.predict(list(test["path"]))
            labels = np.array(pred.labels)[pred.probs.argmax(1)]
            return {"seed": kw.get("seed", 0), **scores(truth, labels, np.asarray(pred.abstain, bool)),
                    "seconds": round(seconds, 1), "class_mix": report.class_mix or None}

        out["adapt"] = run()
        logging.info("%s, adapt: %s", lab, out["adapt"])
        for name, classes, mix in VARIANTS:
            runs = [run(classes=classes, tune_epochs=args.epochs, class_mix=mix, seed=s) for s in range(args.seeds)]
            out[name] = {"runs": runs, "mean ± sd": summary(runs)}
            logging.info("%s, %s: %s", lab, name, out[name]["mean ± sd"])
            write_json(RESULTS, result)  # as far as it got
    print(json.dumps({lab: {k: v.get("mean ± sd", v) for k, v in r.items() if isinstance(v, dict)}
                      for lab, r in result["labs"].items()}, indent=1))


if __name__ == "__main__":
    main()
