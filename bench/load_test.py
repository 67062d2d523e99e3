"""Bounded load check of ``hematoscope serve`` on loopback only.

Starts the real server (``hematoscope serve`` in a subprocess, 127.0.0.1, a free port, its own
history database) and runs N concurrent clients that each send M predict requests of one image
(cycling through the 24 bundled PBC samples). Reports errors, latency percentiles, images/s, how
the server batched the requests (from /api/health) and what else was running; writes
bench/results/load_test.json.

Usage:
    nice -n 10 python bench/load_test.py [--clients 50] [--requests 20] [--model BUNDLE] [--tta N]

Without --model it serves the shipped default model, or, when that is not installed, a tiny
untrained EfficientNet-Lite0 bundle (64 px input) and says so in the results.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "load_test.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick_model(explicit: str | None, workdir: Path) -> tuple[Path, str]:
    if explicit:
        return Path(explicit), "given"
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR, "default"
    from hematoscope.bundle.neural import NeuralBundle
    from hematoscope.models.preprocess import Preprocess
    from hematoscope.samples import sample_paths

    labels = sorted({p.parent.name for p in sample_paths()})
    bundle = NeuralBundle.create(labels, preprocess=Preprocess(size=64), name="tiny-load-test")
    return bundle.save(workdir / "tiny_bundle"), "tiny (default model not installed)"


async def _client(http, url: str, images: list[bytes], offset: int, n: int, latencies: list, statuses: list) -> None:
    for i in range(n):
        image = images[(offset + i) % len(images)]
        start = time.perf_counter()
        try:
            r = await http.post(url, files={"files": ("cell.jpg", image, "image/jpeg")})
            ok = r.status_code == 200 and len(r.json()["items"]) == 1 and r.json()["items"][0]["error"] is None
            statuses.append(r.status_code if ok else f"bad {r.status_code}")
        except Exception as exc:  # a transport failure is an error to count, not a crash
            statuses.append(type(exc).__name__)
        latencies.append(time.perf_counter() - start)


async def _run_load(base: str, images: list[bytes], clients: int, requests: int) -> tuple[list, list, float]:
    import httpx

    latencies: list[float] = []
    statuses: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[_client(http, f"{base}/api/predict", images, c, requests, latencies, statuses)
                               for c in range(clients)])
        wall = time.perf_counter() - start
    return latencies, statuses, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--model", help="bundle to serve (default: shipped model, else a tiny one)")
    parser.add_argument("--workers", type=int, default=2, help="server decode/thumbnail threads")
    parser.add_argument("--tta", type=int, default=None,
                        help="serve a copy of the model with this many fixed views (default: its own setting)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import httpx

    from hematoscope.samples import sample_paths

    workdir = Path(tempfile.mkdtemp(prefix="hematoscope-load-"))
    model, model_note = _pick_model(args.model, workdir)
    if args.tta is not None:
        import shutil

        from hematoscope import load_bundle

        shutil.copytree(model, workdir / "fixed_views")
        b = load_bundle(workdir / "fixed_views")
        b.set_tta(args.tta)
        b.config.cascade = None
        model = b.save(workdir / "fixed_views")  # saved back home: its model.onnx stays
        model_note += f", {args.tta} fixed views"
    paths = sample_paths()
    images = [p.read_bytes() for p in paths]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from predict_speed import other_processes

    others = other_processes()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HEMATOSCOPE_HOME": str(workdir / "home"), "HEMATOSCOPE_CACHE": str(workdir / "cache")}
    env.pop("HEMATOSCOPE_TOKEN", None)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "hematoscope"), "serve", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--db", str(workdir / "history.sqlite3"), "--workers", str(args.workers)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "server.log", "w"),
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{base}/api/health", timeout=2).json()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start; see {workdir / 'server.log'}")
                time.sleep(0.3)
        # One warm-up request so the first client does not pay for lazy initialisation.
        httpx.post(f"{base}/api/predict", files={"files": ("cell.jpg", images[0], "image/jpeg")}, timeout=300)
        load_before = os.getloadavg()[0]
        latencies, statuses, wall = asyncio.run(_run_load(base, images, args.clients, args.requests))
        load_after = os.getloadavg()[0]
        health_after = httpx.get(f"{base}/api/health", timeout=30).json()
        stored = health_after["analyses"] - 1
    finally:
        server.terminate()
        server.wait(timeout=30)

    ms = np.asarray(latencies) * 1000
    errors = sum(s != 200 for s in statuses)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": health["models"][0],
        "model_source": model_note,
        "images": f"{len(images)} bundled PBC samples, one per request in turn "
                  f"({min(map(len, images))}-{max(map(len, images))} bytes)",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "requests": len(statuses),
        "errors": errors,
        "error_kinds": sorted({str(s) for s in statuses if s != 200}),
        "analyses_stored": stored,
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
                       "p99": round(float(np.percentile(ms, 99)), 1), "max": round(float(ms.max()), 1),
                       "mean": round(float(ms.mean()), 1)},
        "throughput_rps": round(len(statuses) / wall, 2),
        "images_per_s": round(len(statuses) / wall, 1),
        "wall_s": round(wall, 1),
        "server_workers": args.workers,
        "batching": health_after.get("batching"),
        "other_processes": others,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, loopback 127.0.0.1",
        "load_average_1min": {"before": round(load_before, 1), "after": round(load_after, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    if errors or stored != len(statuses):
        raise SystemExit(f"{errors} errors, {stored} of {len(statuses)} analyses stored")


if __name__ == "__main__":
    main()
