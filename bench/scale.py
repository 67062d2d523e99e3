"""Scaling out on existing engines (issue 15): Lightning DDP training and Ray Data batch inference,
each against one plain process on the same 2-core machine.

    python bench/scale.py [--data ../shared/data/pbc] [--rows 100000] [--local-rows 20000]
                          [--per-class 200 --val-per-class 100 --epochs 4] [--parts ddp,ray]

1. DDP: ``hematoscope train`` on a PBC subset (``--per-class`` train and ``--val-per-class`` val
   images per class, drawn from the train / val sides of the PBC split of bench/train_pbc.py),
   the basic recipe (EfficientNet-Lite0, ImageNet weights, 128 px, global batch 64), once in one
   process and once in two (``--devices 2 --strategy ddp``, gloo), plus one process with another
   seed for the seed-to-seed spread. Reports validation macro-F1 (whole validation set), wall and
   training time, images/s.
2. Ray: ``hematoscope predict --engine ray`` (a local 2-CPU Ray instance started by the command)
   over a CSV manifest of ``--rows`` rows (the PBC test split's crops repeated), shipped default
   model, 1 view (``--tta 1``), against plain local ``hematoscope predict --tta 1`` over a folder of
   ``--local-rows`` links to the same crops. The driver's RSS and each Ray worker's RSS are sampled
   every 0.5 s. Then both engines classify the PBC test split with the model's shipped 8 views and
   the two CSVs are compared row by row.

Every run is a subprocess of the installed ``hematoscope`` command. The machine is shared:
``machine`` in the JSON records the load and the other busy processes seen during each part.
Results: bench/results/scale.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
HEMATOSCOPE = str(Path(sys.executable).parent / "hematoscope")
PLAIN_RECIPE = REPO / "recipes" / "plain.yaml"  # the recipe its recorded runs used


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- what else runs on the machine ---------------------------------------------------------------
def _short(cmdline: list[str]) -> str:
    """A process's command without paths (names only), e.g. 'python train_pbc.py --epochs 12'."""
    parts = [Path(a).name if "/" in a else a for a in cmdline[:4]]
    return " ".join(parts)[:80]


class Watch:
    """Samples, every ``every`` s: the RSS of ``pid`` (the measured command; with ``driver``) and of
    Ray's worker processes (by title), the load average, and the other processes using CPU (not
    the command's own process tree)."""

    def __init__(self, pid: int | None = None, every: float = 0.5, *, driver: bool = True):
        self.pid, self.every, self.track_driver = pid, every, driver
        self.driver: list[tuple[float, float]] = []
        self.workers: dict[int, list[tuple[float, float, str]]] = {}
        self.busy: dict[str, float] = {}
        self.load: list[tuple[float, ...]] = [os.getloadavg()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.load.append(os.getloadavg())

    def _run(self) -> None:
        import psutil

        mine = {os.getpid()}
        procs: dict[int, psutil.Process] = {}
        n = 0
        while not self._stop.wait(self.every):
            t = time.monotonic() - self._t0
            own: set[int] = set()
            if self.pid:
                try:
                    proc = psutil.Process(self.pid)
                    own = {self.pid, *(c.pid for c in proc.children(recursive=True))}
                    if self.track_driver:
                        self.driver.append((t, proc.memory_info().rss / 2**20))
                except psutil.NoSuchProcess:
                    pass
            n += 1
            for p in psutil.process_iter(["pid", "name", "cmdline"]):
                try:
                    title = " ".join(p.info["cmdline"] or [])
                    if title.startswith("ray::") and ("MapWorker" in title or "BundlePredictor" in title):
                        self.workers.setdefault(p.pid, []).append((t, p.memory_info().rss / 2**20, title[:60]))
                    if n % 4 == 0 and p.pid not in mine:  # every 2 s: who else uses the CPU
                        proc = procs.setdefault(p.pid, p)
                        cpu = proc.cpu_percent(None)
                        if cpu > 20 and not title.startswith("ray::") and p.pid not in own:
                            key = _short(p.info["cmdline"] or [p.info["name"] or "?"])
                            self.busy[key] = max(self.busy.get(key, 0.0), cpu)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue

    def summary(self) -> dict:
        def rss(series: list) -> dict:
            if not series:
                return {}
            v = [s[1] for s in series]
            k = len(v)
            return {"first_mb": round(v[0]), "at_25pct_mb": round(v[k // 4]), "at_50pct_mb": round(v[k // 2]),
                    "at_90pct_mb": round(v[int(k * 0.9)]), "last_mb": round(v[-1]), "peak_mb": round(max(v)),
                    "samples": k}

        return {
            "driver_rss": rss(self.driver),
            "workers_rss": [dict(title=s[0][2], **rss(s)) for s in self.workers.values() if len(s) > 4],
            "load_avg_start": [round(x, 2) for x in self.load[0]],
            "load_avg_end": [round(x, 2) for x in self.load[-1]],
            "other_busy_processes_cpu_pct": {k: round(v) for k, v in sorted(self.busy.items(), key=lambda kv: -kv[1])},
        }


def run(cmd: list[str], *, watch_driver: bool = False, timeout: float = 3600) -> tuple[dict, list[tuple[float, str]]]:
    """Run a hematoscope command; returns ({wall_s, rc, watch}, [(t, stdout line)])."""
    log("$ " + " ".join(_short([c]) if "/" in c else c for c in cmd))
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "COLUMNS": "200"})
    with Watch(proc.pid, driver=watch_driver) as watch:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip()))
        proc.wait(timeout=timeout)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        print("\n".join(line for _, line in lines[-40:]))
        raise SystemExit(f"command failed ({proc.returncode})")
    return {"wall_s": round(wall, 1), "watch": watch.summary()}, lines


# --- data -------------------------------------------------------------------------------------------
def pbc_split(data: Path, work: Path):
    """The PBC split of bench/train_pbc.py (its saved file when present, else made the same way)."""
    from hematoscope.data.splits import load_split

    saved = REPO.parent / "runs" / "pbc-lite0-crosslab-split.csv"
    if saved.is_file():
        return load_split(saved, verify=False), "bench/train_pbc.py split (seed 0, 80/10/10)"
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_pbc", REPO / "bench" / "train_pbc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = work / "pbc_split.csv"
    mod.make_pbc_split(data, out)
    return load_split(out, verify=False), "made as bench/train_pbc.py makes it (seed 0, 80/10/10)"


def ddp_part(split, work: Path, args, previous: dict | None = None) -> dict:
    import numpy as np

    from hematoscope.data.splits import save_split

    rng = np.random.default_rng(0)
    sides = split[split["split"].isin(["train", "val"])].reset_index(drop=True)
    keep = []
    for (side, _), idx in sorted(sides.groupby(["split", "label"]).indices.items()):
        n = args.per_class if side == "train" else args.val_per_class
        keep += list(rng.permutation(idx)[:n])
    subset = sides.iloc[sorted(keep)].reset_index(drop=True)
    subset_csv = work / "ddp_subset.csv"
    save_split(subset, subset_csv)
    sizes = {k: int(v) for k, v in subset.groupby("split").size().items()}
    log(f"DDP subset: {sizes}")
    common = ["--epochs", str(args.epochs), "--batch-size", "64", "--accelerator", "cpu"]
    # runs of an earlier call on the same subset and epochs are kept (--ddp-runs reruns some)
    same = previous and previous.get("subset") == sizes and previous.get("epochs") == args.epochs
    runs = dict(previous["runs"]) if same else {}
    plan = [("one_process", ["--devices", "1"], 0), ("ddp_2_processes", ["--devices", "2", "--strategy", "ddp"], 0)]
    if args.seed_spread:
        plan.append(("one_process_seed1", ["--devices", "1"], 1))
    if args.ddp_runs:
        plan = [r for r in plan if r[0] in args.ddp_runs.split(",")]
    for name, extra, seed in plan:
        out = work / f"run_{name}"
        info, lines = run([HEMATOSCOPE, "train", str(subset_csv), "--out", str(out), "--config", str(PLAIN_RECIPE),
                           *common, *extra, "--seed", str(seed)])
        bundle_cfg = json.loads((out / "bundle" / "config.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        training = bundle_cfg["training"]
        per_epoch = _csv_log_f1(out)
        runs[name] = {
            "seed": seed, "world_size": training.get("world_size", 1),
            "val_macro_f1": round(metrics["macro_f1"], 4), "val_accuracy": round(metrics["accuracy"], 4),
            "val_images": metrics["n"], "val_macro_f1_per_epoch": per_epoch,
            "best_epoch": training["best_checkpoint_epoch"],
            "wall_s": info["wall_s"], "train_s": training["train_seconds_this_session"],
            "train_images_per_second": training["train_images_per_second"],
            "machine": info["watch"], "measured_at_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        }
        log(f"{name}: val macro-F1 {metrics['macro_f1']:.4f}, wall {info['wall_s']} s, "
            f"train {training['train_seconds_this_session']} s ({training['train_images_per_second']} img/s)")
        shutil.rmtree(out, ignore_errors=True)
    one, ddp = runs["one_process"], runs["ddp_2_processes"]
    return {
        "subset": sizes, "epochs": args.epochs, "recipe": "recipes/plain.yaml (Lite0 ImageNet-offline, 128 px of 144, basic augmentation, "
        f"AdamW, cosine), {args.epochs} epochs, global batch 64 (DDP: 32 per process), fit_trust on",
        "runs": runs,
        "ddp_minus_one_process_macro_f1_points": round(100 * (ddp["val_macro_f1"] - one["val_macro_f1"]), 2),
        "seed_spread_macro_f1_points": (round(100 * (runs["one_process_seed1"]["val_macro_f1"] - one["val_macro_f1"]), 2)
                                        if "one_process_seed1" in runs else None),
        "goal_within_1_point": abs(ddp["val_macro_f1"] - one["val_macro_f1"]) <= 0.01,
        "ddp_wall_time_vs_one_process": round(ddp["wall_s"] / one["wall_s"], 2),
        "ddp_train_time_vs_one_process": round(ddp["train_s"] / one["train_s"], 2),
    }


def _csv_log_f1(run_dir: Path) -> list[float]:
    rows = []
    for f in sorted((run_dir / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(f, newline="") as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("val_macro_f1")]
    return [round(float(r["val_macro_f1"]), 4) for r in rows]


def _rate_line(lines) -> float | None:
    for _, line in lines:
        if " images classified in " in line and "images/s" in line:
            return float(line.split(", ")[1].split(" images/s")[0])
    return None


def ray_part(split, work: Path, args) -> dict:
    test = list(split.loc[split["split"] == "test", "path"])[:args.test_limit]
    log(f"PBC test split: {len(test)} images")
    # manifest: the test crops repeated to --rows rows
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        for i in range(args.rows):
            w.writerow([test[i % len(test)]])
    # local baseline: a folder of links to the same crops
    folder = work / "local_links"
    folder.mkdir()
    for i in range(args.local_rows):
        src = Path(test[i % len(test)])
        (folder / f"{i:06d}_{src.name}").symlink_to(src)
    out = {"test_split_images": len(test)}

    info, lines = run([HEMATOSCOPE, "predict", str(folder), "--tta", "1", "--out", str(work / "local.csv")],
                      watch_driver=True)
    out["local"] = {"rows": args.local_rows, "wall_s": info["wall_s"], "images_per_second_pipeline": _rate_line(lines),
                    "images_per_second_wall": round(args.local_rows / info["wall_s"], 1),
                    "machine": info["watch"]}
    log(f"local: {out['local']['images_per_second_pipeline']} img/s")

    info, lines = run([HEMATOSCOPE, "predict", str(manifest), "--engine", "ray", "--tta", "1", "--out",
                       str(work / "ray.csv")], watch_driver=True, timeout=args.ray_timeout)
    shard_times = [(t, line) for t, line in lines if line.startswith("shard ") and " written " in line]
    steady = None
    if len(shard_times) >= 3:
        (t0, _), (t1, _) = shard_times[0], shard_times[-1]
        rows_between = sum(int(line.split("(")[1].split(" rows")[0]) for _, line in shard_times[1:])
        steady = round(rows_between / (t1 - t0), 1)
    end_to_end = round(args.rows / info["wall_s"], 1)
    out["ray"] = {"rows": args.rows, "shards": len(shard_times), "wall_s": info["wall_s"],
                  "images_per_second_steady": steady, "images_per_second_wall": end_to_end,
                  "first_shard_after_s": round(shard_times[0][0], 1) if shard_times else None,
                  "machine": info["watch"]}
    local_rate = out["local"]["images_per_second_pipeline"]
    out["ray_vs_local_steady"] = round(steady / local_rate, 3) if steady and local_rate else None
    out["ray_vs_local_wall"] = round(end_to_end / out["local"]["images_per_second_wall"], 3)
    peak = out["ray"]["machine"]["driver_rss"].get("peak_mb")
    out["goal_driver_peak_rss_below_1GB"] = bool(peak is not None and peak < 1024)
    out["goal_ray_at_least_80pct_of_local"] = bool(out["ray_vs_local_steady"] and out["ray_vs_local_steady"] >= 0.8)
    log(f"ray: steady {steady} img/s, wall {end_to_end} img/s, driver peak {peak} MB")

    # parity on the PBC test split, with the model's own (shipped) views
    test_manifest = work / "test_manifest.csv"
    test_folder = work / "test_links"
    test_folder.mkdir()
    with open(test_manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "source"])
        for i, p in enumerate(test):
            link = test_folder / f"{i:05d}_{Path(p).name}"
            link.symlink_to(p)
            w.writerow([str(link), str(link)])
    info_l, lines_l = run([HEMATOSCOPE, "predict", str(test_folder), "--out", str(work / "test_local.csv")])
    info_r, _ = run([HEMATOSCOPE, "predict", str(test_manifest), "--engine", "ray", "--out",
                     str(work / "test_ray.csv")])
    out["parity_test_split"] = _compare(work / "test_local.csv", work / "test_ray.csv")
    out["parity_test_split"]["views"] = "the model's shipped setting"
    out["parity_test_split"]["wall_s"] = {"local": info_l["wall_s"], "ray": info_r["wall_s"]}
    out["parity_test_split"]["local_images_per_second_shipped_views"] = _rate_line(lines_l)
    log(f"parity: {out['parity_test_split']}")

    # 100 million cells, from the measured per-core rates (2 cores here)
    cores = 2
    per_core = {"1_view": (steady or end_to_end) / cores,
                "shipped_views": (_rate_line(lines_l) or 0) / cores}
    out["estimate_100M_cells"] = {
        "per_core_images_per_second": {k: round(v, 1) for k, v in per_core.items()},
        "core_hours": {k: round(1e8 / v / 3600) for k, v in per_core.items() if v},
        "note": "CPU core-hours at this machine's per-core rate (shared, so an upper bound); decode and model only, "
                "reading from a local disk; add the storage's read time for object stores",
    }
    return out


def _compare(a: Path, b: Path) -> dict:
    def rows(p):
        with open(p, newline="") as f:
            return list(csv.DictReader(f))

    ra, rb = rows(a), rows(b)
    same_order = [r["source"] for r in ra] == [r["source"] for r in rb]
    exact = ("prediction", "abstain", "abstain_reason", "ood_flag", "top1", "top2", "top3", "error")
    mismatches = sum(any(x.get(k) != y.get(k) for k in exact) for x, y in zip(ra, rb))
    def maxdiff(keys) -> float:
        d = [abs(float(x[k]) - float(y[k])) for x, y in zip(ra, rb) for k in x if keys(k) and x[k] and y[k]]
        return max(d) if d else 0.0

    prob_text_differs = sum(any(x[k] != y[k] for k in x if k.endswith("prob") or k == "confidence")
                            for x, y in zip(ra, rb))
    return {"rows": len(ra), "same_sources_in_order": same_order, "rows_differing_in_class_abstain_or_flags": mismatches,
            "rows_whose_printed_probabilities_differ": prob_text_differs,
            "max_abs_diff_probabilities": maxdiff(lambda k: k.endswith("prob") or k == "confidence"),
            "max_abs_diff_ood_score": maxdiff(lambda k: k == "ood_score"),
            "csv_files_identical": a.read_text() == b.read_text()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pbc")
    ap.add_argument("--parts", default="ddp,ray")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed-spread", action=argparse.BooleanOptionalAction, default=True,
                    help="also train one process with seed 1 (the seed-to-seed spread)")
    ap.add_argument("--ddp-runs", default=None, help="comma list: run only these of one_process, ddp_2_processes, "
                    "one_process_seed1 (the others are kept from the JSON when subset and epochs match)")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--local-rows", type=int, default=20_000)
    ap.add_argument("--ray-timeout", type=float, default=1800)
    ap.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (smoke runs)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

    import onnxruntime
    import ray
    import torch

    from hematoscope._io import write_json

    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results.update({
        "script": "bench/scale.py",
        "data": "PBC (Acevedo 2020), shared copy (../shared/data/pbc)",
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "machine_cores": os.cpu_count(),
    })
    with tempfile.TemporaryDirectory(prefix="hematoscope-scale-") as tmp:
        work = Path(tmp)
        split, split_note = pbc_split(args.data, work)
        results["split"] = split_note
        parts = args.parts.split(",")
        if "ddp" in parts:
            start = time.monotonic()
            results["ddp"] = ddp_part(split, work, args, results.get("ddp"))
            results["ddp"]["part_minutes"] = round((time.monotonic() - start) / 60, 1)
            write_json(args.results, results)
        if "ray" in parts:
            start = time.monotonic()
            results["ray"] = ray_part(split, work, args)
            results["ray"]["part_minutes"] = round((time.monotonic() - start) / 60, 1)
    results["measured_at_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    write_json(args.results, results)
    log(f"wrote {args.results}")


if __name__ == "__main__":
    main()
