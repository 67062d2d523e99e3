"""Few-label benchmark on the real PBC images (run with `nice -n 10`; features are cached).

Fixed stratified split of PBC (seed 0): shots are drawn only from the 80 % train part, scores are
on a stratified 2,000-image subset of the held-out 20 %. Usage:

    nice -n 10 .venv/bin/python bench/fewshot_pbc.py --name lite0 [--tta] [--weights W.safetensors]
    .venv/bin/python bench/fewshot_pbc.py --plot     # combine saved runs into curve + table

Writes bench/results/fewshot_pbc_<name>.json (and with --plot fewshot_pbc_curve.png; the tables are printed).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PBC = Path(os.environ.get("HEMATOSCOPE_PBC", Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="lite0")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--shots", default="1,5,10,20,50,100")
    ap.add_argument("--heads", default="lr,svm,knn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-test", type=int, default=2000)
    ap.add_argument("--pool-per-class", type=int, default=200,
                    help="shots come from a fixed random subset of this many train images per class")
    ap.add_argument("--plot", action="store_true", help="only combine saved runs")
    ap.add_argument("--runs", default=None, help="with --plot: comma-separated run names drawn in the curve")
    args = ap.parse_args()
    from hematoscope.fewshot.bench import plot_curve, results_table

    if args.plot:
        runs = {p.stem.removeprefix("fewshot_pbc_"): json.loads(p.read_text())
                for p in sorted(RESULTS.glob("fewshot_pbc_*.json"))}
        drawn = args.runs.split(",") if args.runs else list(runs)
        plot_curve({k: runs[k] for k in drawn}, RESULTS / "fewshot_pbc_curve.png")
        print("\n\n".join(f"### {name}\n{results_table(r)}" for name, r in runs.items()))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from hematoscope import _io
    from hematoscope.data.readers import read_dataset
    from hematoscope.fewshot.bench import run_benchmark
    from hematoscope.fewshot.features import load_extractor
    from hematoscope.fewshot.shots import parse_shots

    table = read_dataset(PBC)
    ext = load_extractor(args.backbone, weights=args.weights, size=args.size, tta=args.tta)
    t0 = time.time()
    res = run_benchmark(table, ext, shots=parse_shots(args.shots), heads=args.heads.split(","),
                        repeats=args.repeats, seed=0, max_test=args.max_test,
                        max_pool_per_class=args.pool_per_class, progress=True)
    res["wall_seconds"] = round(time.time() - t0, 1)
    res["name"] = args.name
    res["skipped_files"] = [os.path.relpath(p, PBC) for p in res["skipped_files"]]  # no machine paths in results
    _io.write_json(RESULTS / f"fewshot_pbc_{args.name}.json", res)
    print(results_table(res))
    print(f"wall {res['wall_seconds']} s; n_test {res['n_test']}; skipped {res['skipped_files']}")


if __name__ == "__main__":
    main()
