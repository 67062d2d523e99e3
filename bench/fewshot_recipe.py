"""Wall time of `hematoscope fewshot bench` with its default recipe on PBC, from a cold cache.

The goal (issue 13): the default recipe (shipped SimCLR Lite0, 224 px, 8 views, svm+self with a
400-per-class unlabelled pool, shots 1,5,10,20,50 x 5 draws) over PBC's 13.7k images with a 3.4k
test set finishes in < 15 minutes on 2 cores. The test set is the test part of a 25 % split
(`hematoscope data split --val 0 --test 0.25 --seed 0`, 3,431 images); labels and the unlabelled
pool come from the rest (the bench drops test files from the pool). The feature cache starts
empty (a temporary HEMATOSCOPE_CACHE), so every feature is computed, and the ONNX export is timed
too. Usage:

    .venv/bin/python bench/fewshot_recipe.py [--name default_recipe] [-- EXTRA BENCH OPTIONS]

Writes bench/results/fewshot_recipe_<name>.json: the command, wall time, machine load, what else
ran, and the benchmark's own JSON.

    .venv/bin/python bench/fewshot_recipe.py --throughput 96

measures instead the feature throughput of the recipe's extractor (8 views, 224 px) on 96 PBC
images with eager PyTorch and with ONNX Runtime (no cache), into fewshot_recipe_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PBC = Path(os.environ.get("HEMATOSCOPE_PBC", REPO.parent / "shared" / "data" / "pbc"))


def _others() -> list[str]:
    """Other busy processes (their command lines), to say what shared the CPU."""
    out = subprocess.run(["ps", "-eo", "pcpu=,args="], capture_output=True, text=True).stdout.splitlines()
    busy = []
    for line in out:
        cpu, _, cmd = line.strip().partition(" ")
        if float(cpu or 0) >= 20 and "fewshot" not in cmd and "ps -eo" not in cmd:
            busy.append(f"{cpu}% {_short(cmd)[:120]}")
    return busy


def _short(cmd: str) -> str:
    """A command line with every absolute path cut to its last part (no local paths in results)."""
    return " ".join(Path(w).name if w.startswith("/") else w for w in cmd.split())


def throughput(n: int) -> dict:
    """Images per second (8 views each) through the recipe's extractor, PyTorch vs ONNX Runtime."""
    import numpy as np

    from hematoscope.data.images import load_image
    from hematoscope.data.readers import read_dataset
    from hematoscope.fewshot.features import load_extractor

    table = read_dataset(PBC)
    paths = table.sample(n=n, random_state=0)["path"].tolist()
    images = [load_image(p, draft_size=224) for p in paths]
    out: dict = {"images": n, "views": 8, "size": 224, "loadavg_before": list(os.getloadavg()),
                 "other_busy_processes": _others()}
    feats = {}
    for backend in ("onnx", "torch"):
        ext = load_extractor("efficientnet_lite0", tta=8, backend=backend)
        ext.embed_arrays(images[:8])  # warm-up (and the one-off ONNX export)
        t0 = time.perf_counter()
        feats[backend] = ext.embed_arrays(images)
        secs = time.perf_counter() - t0
        out[backend] = {"seconds": round(secs, 2), "images_per_second": round(n / secs, 1),
                        "views_per_second": round(8 * n / secs, 1)}
    a, b = feats["torch"].astype(np.float64), feats["onnx"].astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out["min_cosine_onnx_vs_torch"] = float(cos.min())
    out["speedup"] = round(out["onnx"]["images_per_second"] / out["torch"]["images_per_second"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="default_recipe")
    ap.add_argument("--throughput", type=int, help="only measure feature throughput on this many images")
    ap.add_argument("--keep-cache", type=Path, help="use (and keep) this cache dir instead of a fresh one")
    ap.add_argument("extra", nargs="*", help="extra options for `hematoscope fewshot bench` (after --)")
    args = ap.parse_args()
    if args.throughput:
        from hematoscope import _io

        with tempfile.TemporaryDirectory(prefix="fewshot-throughput-") as tmp:
            os.environ["HEMATOSCOPE_CACHE"] = tmp
            res = throughput(args.throughput)
        _io.write_json(RESULTS / "fewshot_recipe_throughput.json", res)
        print(json.dumps(res, indent=1))
        return
    exe = str(Path(sys.executable).parent / "hematoscope")
    with tempfile.TemporaryDirectory(prefix="fewshot-recipe-") as tmp:
        split = Path(tmp) / "pbc_split25.csv"
        subprocess.run([exe, "data", "split", str(PBC), "--val", "0", "--test", "0.25", "--seed", "0",
                        "--out", str(split)], check=True, capture_output=True)
        out_json = Path(tmp) / "bench.json"
        cmd = [exe, "fewshot", "bench", str(PBC), "--test", str(split), "--json", str(out_json), *args.extra]
        env = {**os.environ, "HEMATOSCOPE_CACHE": str(args.keep_cache or Path(tmp) / "cache")}
        load_before, others_before = os.getloadavg(), _others()
        import resource

        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
        if proc.returncode != 0:
            raise SystemExit(proc.returncode)
        result = json.loads(out_json.read_text())
    record = {
        "name": args.name,
        "command": "hematoscope fewshot bench PBC --test SPLIT25.csv " + " ".join(args.extra),
        "wall_seconds": round(wall, 1), "wall_minutes": round(wall / 60, 2),
        "cpu_seconds": round(cpu, 1), "cpu_minutes_per_core": round(cpu / 60 / (os.cpu_count() or 1), 2),
        "cold_cache": args.keep_cache is None, "cpus": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "other_busy_processes_before": others_before, "other_busy_processes_after": _others(),
        "bench": result,
    }
    from hematoscope import _io

    _io.write_json(RESULTS / f"fewshot_recipe_{args.name}.json", record)
    rows = {(r["shots"], r["head"]): r for r in result["results"]}
    print(f"wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min; " + "; ".join(
        f"{s}/class {r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_sd']:.3f}" for (s, _), r in rows.items()))


if __name__ == "__main__":
    main()
