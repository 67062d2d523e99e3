"""JPEG draft (DCT-scaled) decoding vs full decoding: accuracy, answers and OOD scores of a bundle
on the same validation images, and the decoding time of each.

    nice -n 10 python bench/decode_modes.py [--model BUNDLE] [--split SPLIT.csv] [--n 400] [--upscale 512]

Takes a class-stratified random ``--n`` of the split's ``val`` rows, decodes every file both ways
with ``hematoscope.data.images.load_model_image`` (``draft=True`` / ``False``) and runs the bundle
with 1 and 8 views on each (its own fitted trust per view count when it has it). Reports accuracy,
top-1 agreement between the two decodings, mean |difference| of the OOD score and of the top-1
probability, flags that change, and milliseconds per decode. Results:
bench/results/decode_modes.json. ``load_model_image``'s default (``DRAFT_DECODE``) is set from this.

Draft decoding only changes anything when a file is at least twice the model's decode size. The
PBC copy here is 256 x 258 px: for a 128 px model that needs 144 px (crop 0.89) the two decodings
are identical. ``--upscale S`` also measures the files as a lab with a larger camera crop would
send them: each image resized (Lanczos) so its shorter side is S and saved as a JPEG at quality 95,
in memory, before both decodings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "decode_modes.json"
DEFAULT_SPLIT = REPO.parent / "runs" / "pbc-lite0-crosslab-split.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle (default: the shipped default model)")
    ap.add_argument("--split", default=str(DEFAULT_SPLIT))
    ap.add_argument("--n", type=int, default=400, help="validation images (class-stratified random draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upscale", type=int, default=0, help="also measure the files re-encoded at this shorter side")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    from hematoscope import load_bundle
    from hematoscope.data.images import load_image
    from hematoscope.data.readers import read_dataset
    from hematoscope.bundle.default import default_bundle_path
    from hematoscope.trust.fit import table_targets

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from predict_speed import other_processes

    bundle = load_bundle(args.model or default_bundle_path())
    table = read_dataset(args.split)
    val = table[table["split"] == "val"].reset_index(drop=True)
    y_all = table_targets(bundle, val)
    val, y_all = val[y_all >= 0].reset_index(drop=True), y_all[y_all >= 0]
    frac = min(1.0, args.n / len(val))
    pick = (val.assign(y=y_all).groupby("y", group_keys=False).sample(frac=frac, random_state=args.seed).index
            .sort_values())
    paths = [Path(p) for p in val["path"].iloc[pick]]
    y = y_all[pick]
    blobs = [p.read_bytes() for p in paths]
    out = {"bundle": bundle.name, "data": {"split": Path(args.split).name, "part": "val", "images": len(paths),
                                           "draw": f"class-stratified random, seed {args.seed}",
                                           "file_size_px": sorted({tuple(load_image(b).shape[1::-1]) for b in blobs})},
           "preprocess": bundle.preprocess.to_dict(), "decode_size": bundle.preprocess.decode_size,
           "as_stored": compare_modes(bundle, blobs, y, paths)}
    if args.upscale:
        out[f"upscaled_to_{args.upscale}"] = compare_modes(bundle, [upscale(b, args.upscale) for b in blobs], y, paths)
    out["machine"] = {"cores": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()],
                      "other_processes": other_processes()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def upscale(data: bytes, side: int) -> bytes:
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    f = side / min(im.size)
    im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def compare_modes(bundle, blobs, y, paths) -> dict:
    from hematoscope.data.images import load_model_image
    from hematoscope.trust.views import view_outputs

    results = {}
    decoded = {}
    for mode, draft in (("draft", True), ("full", False)):
        t = time.perf_counter()
        decoded[mode] = [load_model_image(b, bundle.preprocess, draft=draft) for b in blobs]
        results[mode] = {"decode_ms_per_image": round((time.perf_counter() - t) * 1000 / len(blobs), 3)}
    results["pixels_differ_share"] = round(float(np.mean([not np.array_equal(a, b) for a, b in
                                                          zip(decoded["draft"], decoded["full"])])), 5)
    preds = {}
    for mode in ("draft", "full"):
        vo = view_outputs(bundle, decoded[mode]) if bundle.supports_tta else view_outputs(bundle, decoded[mode], 1)
        for views in sorted({1, vo.views}):
            pred = bundle.decide(vo.averaged(views), [str(p) for p in paths], views=views)
            preds[(mode, views)] = pred
            correct = pred.probs.argmax(1) == y
            answered = ~np.asarray(pred.abstain, bool)
            results[mode][f"{views}_view{'s' if views > 1 else ''}"] = {
                "accuracy": round(float(correct.mean()), 5), "abstained": round(float(1 - answered.mean()), 5),
                "accuracy_answered": round(float(correct[answered].mean()), 5) if answered.any() else None,
                "ood_flagged": round(float(np.mean(pred.ood_flag)), 5)}
    compare = {}
    for views in sorted({v for _, v in preds}):
        a, b = preds[("draft", views)], preds[("full", views)]
        compare[f"{views}_view{'s' if views > 1 else ''}"] = {
            "top1_agreement": round(float(np.mean(a.probs.argmax(1) == b.probs.argmax(1))), 5),
            "mean_abs_diff_top1_prob": round(float(np.mean(np.abs(a.confidence - b.confidence))), 5),
            "mean_abs_diff_ood_score": (round(float(np.nanmean(np.abs(a.ood_score - b.ood_score))), 5)
                                        if np.isfinite(a.ood_score).any() else None),
            "abstain_changed": round(float(np.mean(a.abstain != b.abstain)), 5)}
    return {**results, "draft_vs_full": compare}


if __name__ == "__main__":
    main()
