"""Outlier screen of training data (``hematoscope data check --outliers``) on real PBC cells with
200 planted non-cell and off-topic images.

A temporary copy (symlinks) of a stratified subset of PBC (``--n-real``, default 2,000: 250 per
class, drawn per seed) gets 200 generated images mixed into its class folders, as if they had been
scraped in by mistake:

- not cells, from ``hematoscope.trust.ood_sets``: pixel noise, flat colour, text, stripes,
  1/f "fractal" textures with natural-image statistics (360 px; flat, text and stripes as PNG);
- off-topic photos: random crops (random size and place, resized to 128-360 px, saved as JPEG
  like PBC) of the natural images shipped with scikit-image (astronaut, cat, coffee, rocket,
  Hubble deep field, brick, grass, gravel, coins, moon, camera man, a scanned page, ...);
- off-topic medical images: crops of a retina photograph and an immunohistochemistry slide
  (tissue, not blood-cell crops), the hardest kind here.

Every image is scored once with the shipped default model's OOD score through the public
library path of the CLI (``hematoscope.trust.outliers.screen_outliers``, 1 test-time view); the
share of planted images flagged and of real cells flagged is reported for the default cut and,
from the same scores, for other cuts, with the AUROC per planted kind. Nothing is written into
the PBC folder. Two draws (seeds 0 and 1) by default, about 15 s each on 2 shared cores. Usage:

    nice -n 10 .venv/bin/python bench/outliers.py [--n-real 2000] [--cut mad:4] [--views 1] [--seeds 0 1]

Writes bench/results/outliers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PBC = Path(os.environ.get("HEMATOSCOPE_PBC", REPO.parent / "shared" / "data" / "pbc"))
#: How the 200 planted images are made: kind -> count.
PLANT = {"noise": 20, "flat": 20, "text": 25, "stripes": 20, "fractal": 35, "photo": 60, "medical_offtopic": 20}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "brick", "grass", "gravel", "coins",
          "moon", "camera", "page", "colorwheel", "logo")
MEDICAL = ("retina", "immunohistochemistry")
OTHER_CUTS = ("mad:3", "mad:3.5", "mad:4", "mad:5", "mad:6", "top:1", "top:5", "top:10", "bundle")


def real_subset(n_real: int, seed: int) -> list[Path]:
    """``n_real`` PBC JPEGs, the same number from each class folder (seeded)."""
    rng = np.random.default_rng(seed)
    classes = sorted(p for p in PBC.iterdir() if p.is_dir())
    per_class = n_real // len(classes)
    chosen = []
    for c in classes:
        files = sorted(f for f in c.iterdir() if f.suffix.lower() == ".jpg" and not f.name.startswith("."))
        chosen += [files[i] for i in sorted(rng.choice(len(files), min(per_class, len(files)), replace=False))]
    return chosen


def _crop(rng, image: np.ndarray) -> np.ndarray:
    from PIL import Image

    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    h, w = image.shape[:2]
    side = int(rng.integers(min(96, min(h, w)), min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out = int(rng.integers(128, 361))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image[y:y + side, x:x + side])).resize(
        (out, out), Image.Resampling.BILINEAR))


def plant(root: Path, classes: list[str], seed: int) -> dict[str, str]:
    """Write the planted images into the class folders of ``root``; returns path -> kind."""
    import skimage.data
    from PIL import Image

    from hematoscope.trust.ood_sets import make_ood_set

    rng = np.random.default_rng(seed)
    kinds: dict[str, str] = {}
    made: list[tuple[str, Path | np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        for kind in ("noise", "flat", "text", "stripes", "fractal"):
            for f in make_ood_set(kind, Path(tmp) / kind, n=PLANT[kind], seed=seed, size=360):
                made.append((kind, np.asarray(Image.open(f).convert("RGB"))))
        sources = {name: getattr(skimage.data, name)() for name in PHOTOS + MEDICAL}
        for kind, names in (("photo", PHOTOS), ("medical_offtopic", MEDICAL)):
            for i in range(PLANT[kind]):
                made.append((kind, _crop(rng, sources[names[i % len(names)]])))
    for i, (kind, image) in enumerate(made):
        folder = root / classes[i % len(classes)]
        fmt, ext = ("PNG", "png") if kind in ("flat", "stripes", "text") else ("JPEG", "jpg")
        path = folder / f"zz_planted_{i:03d}_{kind}.{ext}"
        Image.fromarray(image).save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        kinds[str(path)] = kind
    return kinds


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def run_once(seed: int, n_real: int, cut: str, views: int) -> dict:
    """One draw: a seeded PBC subset with seeded planted images, scored once."""
    from hematoscope.bundle import load_bundle
    from hematoscope.trust.outliers import parse_cut, screen_outliers
    from hematoscope.data.readers import read_dataset
    from hematoscope.bundle.default import default_bundle_path

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pbc-outliers-") as tmp:
        root = Path(tmp) / "pbc_copy"
        real = real_subset(n_real, seed)
        for f in real:
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            (root / f.parent.name / f.name).symlink_to(f)
        classes = sorted(p.name for p in root.iterdir())
        kinds = plant(root, classes, seed)
        table = read_dataset(root)
        bundle = load_bundle(default_bundle_path())
        t1 = time.perf_counter()
        report = screen_outliers(table, bundle, cut=cut, views=views)
        screen_seconds = time.perf_counter() - t1

    scored = {r["path"]: r["score"] for r in report.ranked}
    planted = np.array([scored[p] for p in kinds if p in scored])
    real_scores = np.array([s for p, s in scored.items() if p not in kinds])
    by_kind = {k: np.array([scored[p] for p, kk in kinds.items() if kk == k and p in scored]) for k in PLANT}

    def rates(threshold: float) -> dict:
        return {"threshold": round(threshold, 4),
                "planted_flagged": round(float((planted > threshold).mean()), 4),
                "real_flagged": round(float((real_scores > threshold).mean()), 4),
                "real_flagged_n": int((real_scores > threshold).sum()),
                "planted_flagged_by_kind": {k: round(float((v > threshold).mean()), 4) for k, v in by_kind.items()}}

    all_scores = np.array(list(scored.values()))
    cuts = {c: rates(parse_cut(c).threshold(all_scores, bundle.config.ood.threshold))
            for c in dict.fromkeys((cut, *OTHER_CUTS))}
    worst_real = sorted(((s, p) for p, s in scored.items() if p not in kinds), reverse=True)[:5]
    lowest_planted = sorted((scored[p], kinds[p]) for p in kinds if p in scored)[:5]
    return {
        "seed": seed,
        "real": f"{len(real)} PBC JPEGs, {n_real // len(classes)} per class (seeded draw from ../shared/data/pbc)",
        "real_scored": int(len(real_scores)), "planted_scored": int(len(planted)),
        "planted_flagged": cuts[cut]["planted_flagged"], "real_flagged": cuts[cut]["real_flagged"],
        "at_cut": cuts[cut],
        "other_cuts_same_scores": {c: v for c, v in cuts.items() if c != cut},
        "auroc_real_vs_planted": round(auroc(real_scores, planted), 4),
        "auroc_by_kind": {k: round(auroc(real_scores, v), 4) for k, v in by_kind.items() if len(v)},
        "scores_summary_all": report.scores_summary,
        "highest_real": [{"file": f"{Path(p).parent.name}/{Path(p).name}", "score": round(s, 3)}
                         for s, p in worst_real],
        "lowest_planted": [{"kind": k, "score": round(s, 3)} for s, k in lowest_planted],
        "unscored": len(report.unscored),
        "model": {"name": bundle.name, "ood_method": bundle.config.ood.method, "views": report.views},
        "seconds": {"screen": round(screen_seconds, 1), "total": round(time.perf_counter() - t0, 1),
                    "images_per_second": round(len(scored) / screen_seconds, 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-real", type=int, default=2000, help="real PBC images per draw (the same number per class)")
    ap.add_argument("--cut", default=None, help="outlier cut (default: the library's default)")
    ap.add_argument("--views", type=int, default=1, help="test-time views of the default model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="draws (subset and planted images)")
    ap.add_argument("--out", type=Path, default=RESULTS / "outliers.json")
    args = ap.parse_args()

    from hematoscope import _io
    from hematoscope.trust.outliers import DEFAULT_CUT

    if not (PBC / "basophil").is_dir():
        raise SystemExit(f"PBC images not found at {PBC} (set HEMATOSCOPE_PBC)")
    cut = args.cut or DEFAULT_CUT
    runs = [run_once(seed, args.n_real, cut, args.views) for seed in args.seeds]
    planted_min = min(r["planted_flagged"] for r in runs)
    real_max = max(r["real_flagged"] for r in runs)
    result = {
        "what": "hematoscope data check --outliers: share of 200 planted non-cell / off-topic images flagged and of "
                "real PBC cells flagged, in a temporary symlinked copy of a PBC subset (one entry per draw)",
        "subset": f"{args.n_real} real PBC images per draw ({args.n_real // 8} per class) + 200 planted, "
                  f"draws (seeds) {args.seeds}",
        "planted": {"counts": PLANT,
                    "how": "ood_sets (noise, flat, text, stripes, fractal) at 360 px; photo / medical_offtopic: random "
                           "crops of scikit-image's sample images (photos: " + ", ".join(PHOTOS) + "; medical: "
                           + ", ".join(MEDICAL) + "), 128-360 px; flat / stripes / text saved as PNG, the rest "
                           "as JPEG like PBC; spread over the class folders"},
        "cut": cut,
        "cut_choice": "the default mad:4 was chosen by looking at the seed-0 draw (mad:3.5-4 separate there, mad:5 "
                      "misses off-topic medical crops); the seed-1 draw is a fresh random subset (it may share "
                      "some real images with seed 0) and fresh planted images",
        "planted_flagged_min_over_draws": planted_min,
        "real_flagged_max_over_draws": real_max,
        "target": {"planted_flagged_min": 0.95, "real_flagged_max": 0.01,
                   "met": planted_min >= 0.95 and real_max <= 0.01},
        "runs": runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs",
    }
    _io.write_json(args.out, result)
    print(json.dumps({"cut": cut, "target": result["target"],
                      "runs": [{k: r[k] for k in ("seed", "planted_flagged", "real_flagged", "auroc_real_vs_planted",
                                                  "seconds")} for r in runs]}, indent=1))


if __name__ == "__main__":
    main()
