"""Short CPU SimCLR/DINO run on the unlabelled PBC *train part* (the same fixed split as
bench/fewshot_pbc.py, so no test image is seen, even unlabelled). Run with `nice -n 10`:

    nice -n 10 .venv/bin/python bench/ssl_pbc.py --minutes 10 --out ../runs/ssl_lite0.safetensors
    nice -n 10 .venv/bin/python bench/fewshot_pbc.py --name ssl10 --weights ../runs/ssl_lite0.safetensors

Writes bench/results/ssl_pbc.json (steps, loss trend, time); the weights stay out of git.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PBC = Path(os.environ.get("HEMATOSCOPE_PBC", Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from hematoscope import _io
    from hematoscope.data.readers import read_dataset
    from hematoscope.fewshot.bench import holdout_split
    from hematoscope.fewshot.ssl import loss_trend, save_backbone, train_ssl

    pool, _ = holdout_split(read_dataset(PBC), seed=0)  # same split as the few-shot benchmark
    res = train_ssl(list(pool["path"]), method=args.method, size=args.size, batch_size=args.batch_size,
                    minutes=args.minutes, num_workers=1, progress=False)
    save_backbone(res.backbone, args.out, res.meta)
    first, last = loss_trend(res.losses, window=10)
    report = {**res.meta, "loss_first10": first, "loss_last10": last, "losses": res.losses,
              "torch_threads": __import__("torch").get_num_threads()}
    _io.write_json(RESULTS / f"ssl_pbc_{args.method}.json", report)
    print(f"{res.steps} steps in {res.seconds:.0f} s; loss {first:.3f} -> {last:.3f}; weights -> {args.out}")


if __name__ == "__main__":
    main()
