"""Prediction speed on this machine: PyTorch eager vs ONNX Runtime float32 vs int8, side by side.

    nice -n 10 python bench/predict_speed.py [--model BUNDLE] [--data ../shared/data/pbc] [--limit N]

Measures, in one run, for each backend:
- model only: images/s at batch 1 and batch 64 (preprocessed input, no decoding);
- single-image latency as the web API sees it (JPEG bytes -> decode -> preprocess -> model ->
  calibrated decision), p50 / p95 in ms;
- end to end over a folder (``hematoscope.predict.predict_paths``: threaded decoding overlapping
  inference), images/s; for ONNX float32 also without JPEG draft decoding, with the top-1
  agreement between the two;
- cold start: process start to first prediction, in a fresh subprocess (median of 3).

The bundle is ``--model``, else the shipped default model, else an untrained EfficientNet-Lite0 at
128 px (said so in the JSON: speed does not depend on the weights, agreement numbers do). The ONNX
copies are made with ``hematoscope.export.onnx.export_onnx`` into a temporary directory. Results:
bench/results/predict_speed.json.
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "predict_speed.json"
PBC_LABELS = ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
              "neutrophil", "platelet"]

COLD_START = """
import sys
from hematoscope import load_bundle
bundle = load_bundle(sys.argv[1])
pred = bundle.predict([sys.argv[2]])
assert len(pred) == 1
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def source_bundle(model: str | None):
    """(bundle, description): --model, else the default model, else an untrained Lite0 at 128 px."""
    from hematoscope import load_bundle
    from hematoscope.models.default import DefaultModelMissing, default_bundle_path

    if model:
        return load_bundle(model), f"{model}"
    try:
        path = default_bundle_path()
        return load_bundle(path), f"shipped default model ({path.name})"
    except DefaultModelMissing:
        import torch

        from hematoscope.bundle.neural import NeuralBundle
        from hematoscope.models.preprocess import Preprocess

        torch.manual_seed(0)
        bundle = NeuralBundle.create(PBC_LABELS, preprocess=Preprocess(size=128), name="untrained-lite0-128")
        return bundle, "UNTRAINED EfficientNet-Lite0 at 128 px (default model not shipped yet)"


def model_only(runner, x, batch: int, min_seconds: float = 3.0) -> dict:
    """Images/s of runner.run on batches of ``batch`` preprocessed images (wall clock, and per
    CPU-second of this process: the second is robust to other jobs on a shared machine)."""
    xb = x[:batch] if batch <= len(x) else x[[i % len(x) for i in range(batch)]]
    for _ in range(2):
        runner.run(xb)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < min_seconds:
        runner.run(xb)
        n += batch
    return _rates(n, time.perf_counter() - start, time.process_time() - cpu)


def _rates(n: int, wall: float, cpu: float) -> dict:
    return {"images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1), "images": n,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def latency(bundle, files: list[Path], n: int = 200, budget_s: float = 30.0) -> dict:
    """Single-image request latency: bytes -> decode -> preprocess -> model -> decision, over up
    to ``n`` images (fewer when ``budget_s`` runs out, but at least 20)."""
    from hematoscope.data.images import load_image

    payloads = [f.read_bytes() for f in files[:n]]
    for data in payloads[:5]:
        bundle.predict_arrays([load_image(data)], ["x"])
    times, cpu_times = [], []
    deadline = time.perf_counter() + budget_s
    for data in payloads:
        if len(times) >= 20 and time.perf_counter() > deadline:
            break
        t, c = time.perf_counter(), time.process_time()
        bundle.predict_arrays([load_image(data)], ["x"])
        times.append((time.perf_counter() - t) * 1000)
        cpu_times.append((time.process_time() - c) * 1000)
    q = statistics.quantiles(times, n=20)
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(q[18], 2), "n": len(times),
            "cpu_ms_p50": round(statistics.median(cpu_times), 2)}


def end_to_end(bundle, items, **kwargs) -> tuple[dict, list[str]]:
    from hematoscope.predict import predict_sources

    start, cpu = time.perf_counter(), time.process_time()
    n, skipped, predicted = 0, 0, []
    for pred in predict_sources(bundle, items, **kwargs):
        n += len(pred)
        skipped += len(pred.skipped)
        predicted.extend(pred.predicted)
    return {**_rates(n, time.perf_counter() - start, time.process_time() - cpu), "skipped": skipped}, predicted


def _timed_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a child process run to completion."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cold_start(bundle_dir: Path, image: Path, repeats: int = 3) -> dict:
    """Process start to first prediction: Python API and the CLI, in fresh processes."""
    api = [_timed_child([sys.executable, "-c", COLD_START, str(bundle_dir), str(image)]) for _ in range(repeats)]
    cli = _timed_child([str(Path(sys.executable).with_name("hematoscope")), "predict", "--model", str(bundle_dir),
                        str(image)])
    return {"python_api_s": round(statistics.median(w for w, _ in api), 2),
            "python_api_cpu_s": round(statistics.median(c for _, c in api), 2),
            "runs_s": [round(w, 2) for w, _ in api],
            "cli_predict_one_image_s": round(cli[0], 2), "cli_predict_one_image_cpu_s": round(cli[1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle to measure (default: shipped default model, else untrained Lite0)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pbc"))
    ap.add_argument("--limit", type=int, default=None, help="images for the end-to-end runs (default: all)")
    ap.add_argument("--torch-limit", type=int, default=None,
                    help="images for the torch end-to-end run (default: --limit)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import numpy as np
    import torch

    from hematoscope.bundle.neural import TorchRunner
    from hematoscope.data.images import load_image
    from hematoscope.export.onnx import OnnxRunner, export_onnx, physical_cores
    from hematoscope.predict.sources import ImageSource, expand_paths

    threads = physical_cores()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    items = [i for i in expand_paths([args.data]) if isinstance(i, ImageSource)]
    every = items[:: max(1, len(items) // 400)][:400]  # class-spread subset for agreement checks
    e2e_items = items[: args.limit] if args.limit else items
    files = [i.path for i in every]

    work = Path(tempfile.mkdtemp(prefix="predict-speed-"))
    bundle, described = source_bundle(args.model)
    log(f"bundle: {described}; preprocess {bundle.preprocess}")
    dirs = {"torch": bundle.save(work / "torch")}
    exports = {}
    for name, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
        log(f"exporting {name}")
        rep = export_onnx(bundle, work / name, quantize=quantize, validation=_table(files) if quantize else None,
                          min_agreement=0.0)
        dirs[name] = work / name
        exports[name] = {k: rep.to_dict()[k] for k in ("max_prob_diff", "top1_agreement", "agreement_source",
                                                        "accuracy", "size_bytes", "seconds")}

    from hematoscope import load_bundle

    bundles = {name: load_bundle(d) for name, d in dirs.items()}
    bundles["torch"].use_backend("torch")
    runners = {"torch": TorchRunner(bundles["torch"].net), "onnx_fp32": bundles["onnx_fp32"].runner,
               "onnx_int8": bundles["onnx_int8"].runner}
    assert isinstance(runners["onnx_int8"], OnnxRunner)
    x = bundles["torch"].preprocess([load_image(f) for f in files[:64]])

    results: dict = {"model_only": {}, "latency_single_image": {}, "end_to_end": {}, "cold_start": {}}
    for name, runner in runners.items():
        for batch in (1, 64):
            res = results["model_only"][f"{name}_batch{batch}"] = model_only(runner, x, batch)
            log(f"model only {name} batch {batch}: {res}")
    for name, b in bundles.items():
        results["latency_single_image"][name] = latency(b, files)
        log(f"latency {name}: {results['latency_single_image'][name]}")
    predictions = {}
    for name, b in bundles.items():
        run_items = e2e_items[: args.torch_limit] if name == "torch" and args.torch_limit else e2e_items
        results["end_to_end"][name], predictions[name] = end_to_end(b, run_items, batch_size=64)
        log(f"end to end {name}: {results['end_to_end'][name]}")
    res, no_draft = end_to_end(bundles["onnx_fp32"], e2e_items, batch_size=64, draft=False)
    res["top1_agreement_with_draft"] = round(float(np.mean(np.array(no_draft) == np.array(predictions["onnx_fp32"]))), 5)
    results["end_to_end"]["onnx_fp32_no_draft"] = res
    log(f"end to end onnx_fp32 without JPEG draft: {res}")
    for workers in (1, 3):
        key = f"onnx_fp32_workers{workers}"
        results["end_to_end"][key], _ = end_to_end(bundles["onnx_fp32"], e2e_items, batch_size=64, workers=workers)
        log(f"end to end {key}: {results['end_to_end'][key]}")
    for name in ("onnx_fp32", "onnx_int8", "torch"):
        results["cold_start"][name] = cold_start(dirs[name], files[0])
        log(f"cold start {name}: {results['cold_start'][name]}")

    out = {
        "bundle": described,
        "preprocess": bundle.preprocess.to_dict(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_used": threads,
                    "load_avg_before": [round(v, 2) for v in load_before],
                    "load_avg_after": [round(v, 2) for v in os.getloadavg()],
                    "note": "shared 2-core machine; other jobs were running (see load averages)"},
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                     "python": platform.python_version()},
        "data": {"path": args.data, "end_to_end_images": len(e2e_items)},
        "exports": exports,
        **results,
        "goals": {"end_to_end_images_per_s": 400, "single_image_p50_ms": 20, "cold_start_s": 2},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {args.out}")


def _table(files):
    """A samples table for the int8 agreement check, labelled by the PBC folder names."""
    from hematoscope.data.samples import make_table

    return make_table([{"path": str(f), "label": f.parent.name} for f in files], "pbc")


if __name__ == "__main__":
    main()
