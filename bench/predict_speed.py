"""Prediction speed and accuracy in one run, on the same labelled files: torch eager, ONNX Runtime
with 1 view, with 8 views and with the adaptive cascade; plus a profile of the pipeline's stages.

    nice -n 10 python bench/predict_speed.py [--model BUNDLE] [--split SPLIT.csv] [--part test]
                                            [--limit N] [--torch-limit N] [--out JSON]

- Files: the ``--part`` rows (default ``test``) of ``--split`` (default: the default model's PBC
  split, ``../runs/pbc-lite0-crosslab-split.csv``), so accuracy and abstain rates are measured
  on images the model never saw.
- End to end (``hematoscope.predict.predict_sources``: threaded decoding with the one decode
  path, overlapping inference, the bundle's trust decisions): images/s, CPU s, accuracy,
  abstained share, accuracy of the answered images, and for the cascade the share of images
  that took the slow path. Torch eager runs 1 view on ``--torch-limit`` images (it is slow).
- Thread settings: ONNX Runtime intra-op threads x decode threads, cascade end to end.
- Stage profile (one thread, per image): read, decode (draft and full), early resize,
  preprocessing (resize, crop, colour canonicalisation, normalisation), the network for 1 view at
  batch 1/16/64, trust decisions (OOD score + abstain), CSV writing.
- Single-image latency (bytes -> answer, as the web API does it), cold start.

A bundle without a fitted cascade gets per-view trust fitted first, into a temporary copy, on the
split's ``val`` rows (``hematoscope trust fit``), and the JSON says so. Also recorded: the load
average and the busiest other processes, since this machine is often shared.
Results: bench/results/predict_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "predict_speed.json"
DEFAULT_SPLIT = REPO.parent / "runs" / "pbc-lite0-crosslab-split.csv"

COLD_START = """
import sys
from hematoscope import load_bundle
bundle = load_bundle(sys.argv[1])
pred = bundle.predict([sys.argv[2]])
assert len(pred) == 1
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def other_processes(n: int = 6) -> list[str]:
    """The busiest processes other than this one (what else was running)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines()[1:]:
        pid, pcpu, etime, *args = line.split(None, 3)
        if int(pid) == os.getpid() or float(pcpu) < 5:
            continue
        words = [Path(w).name if w.startswith("/") else w for w in " ".join(args).split()]  # no absolute paths
        rows.append(f"{pcpu}% cpu, running {etime}: {' '.join(words)[:120]}")
    return rows[:n]


def _rates(n: int, wall: float, cpu: float) -> dict:
    return {"images": n, "images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1),
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def end_to_end(bundle, items, truth: dict[str, int], **kwargs) -> dict:
    """Classify ``items`` through the pipeline; speed, accuracy and abstentions."""
    from hematoscope.predict import predict_sources

    start, cpu = time.perf_counter(), time.process_time()
    preds = list(predict_sources(bundle, items, **kwargs))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    from hematoscope.bundle.prediction import Prediction

    pred = Prediction.concat(preds, bundle.labels)
    y = np.array([truth[s] for s in pred.sources])
    correct = pred.probs.argmax(1) == y
    answered = ~np.asarray(pred.abstain, bool)
    res = {**_rates(len(pred), wall, cpu), "skipped": len(pred.skipped),
           "accuracy": round(float(correct.mean()), 5), "abstained": round(float(1 - answered.mean()), 5),
           "accuracy_answered": round(float(correct[answered].mean()), 5),
           "ood_flagged": round(float(np.mean(pred.ood_flag)), 5), "views": bundle.view_mode}
    if bundle.uses_cascade:
        res["slow_share"] = round(float(pred.share_with_views(bundle.config.cascade.slow_views)), 5)
    return res


def profile_stages(bundle, files: list[Path], csv_dir: Path) -> dict:
    """Milliseconds per image of each stage, one thread."""
    from hematoscope.data.images import load_image
    from hematoscope.predict.report import ReportWriter

    pre = bundle.preprocess
    ms = {}

    def timed(name, fn, n):
        t = time.perf_counter()
        out = fn()
        ms[name] = round((time.perf_counter() - t) * 1000 / n, 3)
        return out

    n = len(files)
    blobs = timed("read_file", lambda: [f.read_bytes() for f in files], n)
    drafted = timed("decode_jpeg_draft", lambda: [load_image(b, draft_size=pre.decode_size) for b in blobs], n)
    timed("decode_jpeg_full", lambda: [load_image(b) for b in blobs], n)
    resize = pre.early_resizer() or (lambda im: im)
    early = timed("early_resize", lambda: [resize(im) for im in drafted], n)
    resized = timed("resize_and_crop", lambda: np.stack([pre.resize_image(im) for im in early]), n)
    x = timed("normalise_and_colour", lambda: np.concatenate([pre.normalize(resized[i:i + 64])
                                                              for i in range(0, n, 64)]), n)
    runner = bundle.runner
    chunk = getattr(runner, "chunk", None)
    if chunk:  # the raw session at each batch size, then the runner's own chunking at 64
        for batch in (1, 8, 16, 64):
            session_run = lambda xb: runner.session.run(None, {runner.input_name: xb})  # noqa: E731
            session_run(x[:batch])

            def run_raw(batch=batch):
                for i in range(0, n, batch):
                    session_run(x[i:i + batch])
            timed(f"onnx_session_batch{batch}", run_raw, n)
    for batch in (1, 16, 64):
        runner.run(x[:batch])

        def run(batch=batch):
            for i in range(0, n, batch):
                runner.run(x[i:i + batch])
        timed(f"network_1_view_batch{batch}", run, n)
    outs = [runner.run(x[i:i + 64]) for i in range(0, n, 64)]
    from hematoscope.bundle.base import ModelOutput

    out = ModelOutput(np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))
    names = [str(f) for f in files]
    pred = timed("trust_decision_1_view", lambda: bundle.decide(out, names, views=1), n)
    if bundle.ood is not None:
        timed("ood_score_only", lambda: bundle.ood.score(features=out.features, logits=out.logits), n)

    def write():
        w = ReportWriter(csv_dir / "profile.csv", bundle.labels)
        w.add(pred)
        w.close()
    timed("write_csv", write, n)
    return ms


def latency(bundle, files: list[Path], n: int = 200) -> dict:
    """Single-image request latency: bytes -> decode -> model -> decision."""
    from hematoscope.data.images import load_model_image

    payloads = [f.read_bytes() for f in files[:n]]
    for data in payloads[:5]:
        bundle.predict_arrays([load_model_image(data, bundle.preprocess)], ["x"])
    times = []
    for data in payloads:
        t = time.perf_counter()
        bundle.predict_arrays([load_model_image(data, bundle.preprocess)], ["x"])
        times.append((time.perf_counter() - t) * 1000)
    q = statistics.quantiles(times, n=20)
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(q[18], 2), "n": len(times)}


def cold_start(bundle_dir: Path, image: Path, repeats: int = 3) -> dict:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", COLD_START, str(bundle_dir), str(image)], check=True)
        runs.append(time.perf_counter() - t)
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("hematoscope")), "predict", "--model", str(bundle_dir),
                    str(image)], check=True, stdout=subprocess.DEVNULL)
    return {"python_api_s": round(statistics.median(runs), 2),
            "cli_predict_one_image_s": round(time.perf_counter() - t, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle to measure (default: the shipped default model)")
    ap.add_argument("--split", default=str(DEFAULT_SPLIT), help="split CSV with labelled rows")
    ap.add_argument("--part", default="test", help="split rows to classify")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images (stratified order kept)")
    ap.add_argument("--torch-limit", type=int, default=300, help="images for the torch eager run")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: torch,threads,profile,latency,cold")
    ap.add_argument("--refit", action="store_true",
                    help="refit per-view trust and the cascade (hematoscope trust fit defaults) into the copy first")
    ap.add_argument("--max-train", type=int, default=5000, help="train images for that fit (trust fit --max-train)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from hematoscope import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.bundle.neural_onnx import OnnxRunner, physical_cores
    from hematoscope.export.onnx import export_onnx
    from hematoscope.bundle.default import default_bundle_path
    from hematoscope.data.sources import ImageSource
    from hematoscope.trust.fit import table_targets

    load_before = os.getloadavg()
    others_before = other_processes()
    work = Path(tempfile.mkdtemp(prefix="predict-speed-"))
    source = Path(args.model) if args.model else default_bundle_path()
    bundle = load_bundle(source)
    table = read_dataset(args.split)
    notes = []
    bundle_dir = work / "bundle"
    if bundle.config.cascade is None or args.refit:
        from hematoscope.trust.fit import fit_trust_on_table

        log("fitting per-view trust and the cascade on the split's train/val rows into a copy")
        t = time.perf_counter()
        fit_trust_on_table(bundle, table, max_train=args.max_train)
        notes.append(f"per-view trust and cascade fitted by this script (hematoscope trust fit defaults, --max-train "
                     f"{args.max_train}) on the train/val rows of {Path(args.split).name} ({time.perf_counter() - t:.0f}"
                     " s), into a copy; the bundle itself is unchanged")
    if (Path(source) / "model.onnx").is_file():
        bundle.save(bundle_dir)
        import shutil

        shutil.copy2(Path(source) / "model.onnx", bundle_dir / "model.onnx")
    else:
        export_onnx(bundle, bundle_dir)
    rows = table[table["split"] == args.part].reset_index(drop=True)
    targets = table_targets(bundle, rows)
    rows, targets = rows[targets >= 0], targets[targets >= 0]
    if args.limit:
        rows, targets = rows.iloc[: args.limit], targets[: args.limit]
    items = [ImageSource(str(p), Path(p)) for p in rows["path"]]
    truth = dict(zip(map(str, rows["path"]), targets.tolist()))
    files = [Path(p) for p in rows["path"]]
    log(f"{len(items)} {args.part} images of {Path(args.split).name}; bundle {bundle.name} (measured copy: {bundle_dir})")

    results: dict = {"end_to_end": {}}
    onnx = load_bundle(bundle_dir)
    assert onnx._uses_onnx()
    for mode in ("cascade", "cascade_recolour", 1, 2, 4, 8):
        onnx = load_bundle(bundle_dir)
        if mode == "cascade_recolour":
            if not onnx.reframes:
                continue
            onnx.set_recolour()  # `predict --recolour`
        elif mode != "cascade":
            onnx.set_tta(mode)
        onnx.predict_arrays([np.zeros((64, 64, 3), np.uint8)], ["warm-up"])
        key = f"onnx_{mode}" + ("" if isinstance(mode, str) else "_view" + ("s" if mode > 1 else ""))
        results["end_to_end"][key] = end_to_end(onnx, items, truth, batch_size=64)
        log(f"end to end {key}: {results['end_to_end'][key]}")
    if "torch" not in skip:
        torch_bundle = load_bundle(bundle_dir)
        torch_bundle.use_backend("torch")
        torch_bundle.set_tta(1)
        import torch

        torch.set_num_threads(physical_cores())
        results["end_to_end"]["torch_1_view"] = end_to_end(torch_bundle, items[: args.torch_limit], truth,
                                                           batch_size=64)
        log(f"end to end torch_1_view: {results['end_to_end']['torch_1_view']}")
    if "threads" not in skip:
        results["threads_cascade"] = {}
        for ort_threads in (1, 2):
            for workers in (1, 2, 3):
                b = load_bundle(bundle_dir)
                b._runner = OnnxRunner(bundle_dir / "model.onnx", threads=ort_threads)
                res = end_to_end(b, items[:600], truth, batch_size=64, workers=workers)
                results["threads_cascade"][f"ort{ort_threads}_decode{workers}"] = res
                log(f"cascade, ORT threads {ort_threads}, decode threads {workers}: {res['images_per_s']} img/s")
    if "profile" not in skip:
        b = load_bundle(bundle_dir)
        results["profile_ms_per_image"] = profile_stages(b, files[:512], work)
        log(f"profile: {results['profile_ms_per_image']}")
    if "latency" not in skip:
        results["latency_single_image"] = {}
        for mode in ("cascade", 1, 8):
            b = load_bundle(bundle_dir)
            if mode != "cascade":
                b.set_tta(mode)
            results["latency_single_image"][str(mode)] = latency(b, files)
            log(f"latency {mode}: {results['latency_single_image'][str(mode)]}")
    if "cold" not in skip:
        results["cold_start"] = cold_start(bundle_dir, files[0])
        log(f"cold start: {results['cold_start']}")

    out = {
        "bundle": f"{bundle.name} ({'given with --model' if args.model else 'shipped default model'})",
        "preprocess": bundle.preprocess.to_dict(),
        "cascade": onnx.config.cascade.model_dump(mode="json") if onnx.config.cascade else None,
        "data": {"split": Path(args.split).name, "part": args.part, "images": len(items)},
        "notes": notes,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "onnx_threads": physical_cores(),
                    "load_avg_before": [round(v, 2) for v in load_before],
                    "load_avg_after": [round(v, 2) for v in os.getloadavg()],
                    "other_processes_before": others_before, "other_processes_after": other_processes()},
        "versions": {"onnxruntime": __import__("onnxruntime").__version__, "python": platform.python_version()},
        **results,
        "goals": {"default_end_to_end_images_per_s": 400, "accuracy_vs_8_views_points": -0.1,
                  "abstained_max": 0.06, "abstained_every_view_count": [0.04, 0.07]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
