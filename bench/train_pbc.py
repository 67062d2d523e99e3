"""Train the shipped default model on PBC with the library's own ``train()``, evaluate it on a
held-out test split, and (with --ship) install its bundle into src/hematoscope/default_model/.

    python bench/train_pbc.py --data ../shared/data/pbc --run-dir ../runs/pbc-lite0-ssl-e24 --ship

Split (seed 0, saved in RUN_DIR/../pbc_split.csv): 80 % train / 10 % val / 10 % test, stratified
by class; byte-identical files are grouped so duplicates never straddle two sides; unreadable
files are dropped; the images shipped as package samples (hematoscope.samples) are put on the test
side so that the sample-prediction test is not answered from training data. Validation selects
the checkpoint and fits the temperature / OOD threshold; the test split is used once, here.

Re-running skips the training when RUN_DIR/bundle exists (so evaluation can be redone alone).
Results: bench/results/train_pbc.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "train_pbc.json"
DEFAULT_MODEL = REPO / "src" / "hematoscope" / "default_model"

#: The cross-lab recipe (recipes/default-model.yaml, measured in docs/crosslab.md): Lite0 from the
#: shipped SimCLR weights, per-image colour canonicalisation in the bundle's preprocessing and
#: domain randomisation (stain, hue, gamma, optics, camera, framing) in training.
RECIPE_FILE = REPO / "recipes" / "default-model.yaml"


def load_recipe() -> tuple[dict, int]:
    """The default model's recipe (train options) and its epoch count, from RECIPE_FILE."""
    import yaml

    recipe = yaml.safe_load(RECIPE_FILE.read_text(encoding="utf-8"))
    return {k: v for k, v in recipe.items() if k != "epochs"}, recipe["epochs"]


RECIPE, RECIPE_EPOCHS = load_recipe()
#: The shipped model's framing search (ReframeRule, docs/crosslab.md): centre crops for cells
#: flagged as unlike PBC (LISC macro-F1 0.68 -> 0.81). Padded frames (1.5-2.5x) are left out:
#: they cost a tenth of the cascade's speed for a few points on tight crops, which
#: `predict --framing auto` and `adapt` recover far better.
REFRAME_ZOOMS = [0.85, 0.75, 0.6]


def readable(path: str) -> bool:
    from hematoscope.data.images import ImageError, load_image

    try:
        load_image(path, draft_size=32)
        return True
    except ImageError:
        return False


def make_pbc_split(data: Path, out: Path):
    """The 80/10/10 split described in the module docstring, saved to ``out``."""
    from hematoscope.data.readers import read_dataset
    from hematoscope._io import file_sha256
    from hematoscope.data.splits import make_split, save_split
    from hematoscope.samples import sample_paths

    table = read_dataset(data, reader="pbc")
    with ThreadPoolExecutor(2) as pool:
        ok = list(pool.map(readable, table["path"], chunksize=64))
        table = table[ok].reset_index(drop=True)
        table["content"] = list(pool.map(file_sha256, table["path"], chunksize=64))
    logging.info("%d readable images (%d dropped)", len(table), len(ok) - sum(ok))
    df = make_split(table, val=0.1, test=0.1, seed=0, group_by="content")
    shipped = {(p.parent.name, p.name) for p in sample_paths()}
    is_sample = [(Path(p).parent.name, Path(p).name) in shipped for p in df["path"]]
    forced = df.loc[is_sample, "content"]
    moved = df["content"].isin(set(forced)) & (df["split"] != "test")
    df.loc[df["content"].isin(set(forced)), "split"] = "test"
    logging.info("moved %d sample images (and duplicates) to test", int(moved.sum()))
    save_split(df.drop(columns="content"), out)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pbc")
    ap.add_argument("--run-dir", type=Path, default=REPO.parent / "runs" / "pbc-lite0-ssl-e24")
    ap.add_argument("--epochs", type=int, default=RECIPE_EPOCHS)
    ap.add_argument("--ship", action="store_true", help="install the bundle into src/hematoscope/default_model")
    ap.add_argument("--frozen-bn", action="store_true", help="keep the pretrained BatchNorm statistics (TrainConfig "
                    "frozen_bn); measured in docs/crosslab.md: worse on LISC at 12 epochs, and adapt breaks it")
    ap.add_argument("--norm", choices=("batch", "group", "group_early"), default="batch",
                    help="normalisation layers (TrainConfig norm): group = GroupNorm in place of BatchNorm")
    ap.add_argument("--weights", default=RECIPE["weights"],
                    help="starting weights (TrainConfig weights): hematoscope-simclr-pbc (the shipped SimCLR Lite0, "
                    "self-supervised on PBC's unlabelled images) or imagenet-offline (the recipe before 2026-11-29)")
    ap.add_argument("--name", default="hematoscope-pbc-lite0-ssl-e24", help="bundle name")
    ap.add_argument("--load", default="idle", help="what else ran on the machine during the run, recorded with "
                    "the timings (e.g. 'idle', 'shared with a CI run')")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field (a TrainConfig field; VALUE as JSON), for experiments")
    args = ap.parse_args()
    recipe = {**RECIPE, "frozen_bn": True} if args.frozen_bn else RECIPE
    recipe = {**recipe, "norm": args.norm} if args.norm != "batch" else recipe
    recipe = {**recipe, "weights": args.weights}
    for item in args.set:
        key, _, value = item.partition("=")
        recipe = {**recipe, key: json.loads(value)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    import torch

    from hematoscope import load_bundle
    from hematoscope._io import file_sha256
    from hematoscope.data.splits import load_split
    from hematoscope.train import TrainConfig, resume, train
    from hematoscope.trust.fit import size_reference_images

    split_file = args.run_dir.parent / f"{args.run_dir.name}-split.csv"
    if not split_file.exists():
        make_pbc_split(args.data, split_file)
    table = load_split(split_file)
    logging.info("split: %s", table.groupby("split").size().to_dict())

    bundle_dir = args.run_dir / "bundle"
    timing = {}
    if not bundle_dir.exists():
        start = time.monotonic()
        config = TrainConfig(data=str(split_file), out=str(args.run_dir), name=args.name,
                             epochs=args.epochs, **recipe)
        done_before = (args.run_dir / "checkpoints" / "last.ckpt").exists()
        result = resume(args.run_dir) if done_before else train(config)
        timing = {"wall_minutes": round((time.monotonic() - start) / 60, 1),
                  "train_minutes": round(result.train_seconds / 60, 1),
                  "train_images_per_second": round(result.images_per_second, 1),
                  "epochs": result.epochs_completed, "resumed": done_before}
        (args.run_dir / "timing.json").write_text(json.dumps(timing, indent=2))
    else:
        timing = json.loads((args.run_dir / "timing.json").read_text())

    from hematoscope.evaluate import evaluate_bundle

    bundle = load_bundle(bundle_dir)
    val_metrics = json.loads((args.run_dir / "metrics.json").read_text())
    start = time.monotonic()
    test = evaluate_bundle(bundle, table[table["split"] == "test"].reset_index(drop=True))
    test_seconds = time.monotonic() - start

    def headline(m: dict) -> dict:
        return {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece") if k in m}

    results = {
        "script": "bench/train_pbc.py",
        "data": "PBC (Acevedo 2020), shared copy; split seed 0, 80/10/10, duplicates grouped",
        "split_file_sha256": file_sha256(split_file),
        "split_sizes": {k: int(v) for k, v in table.groupby("split").size().items()},
        "recipe": {**recipe, "epochs": timing.get("epochs", args.epochs)},
        "val": headline(val_metrics),
        "val_calibrated_ece": val_metrics.get("ece_after"),
        "temperature": val_metrics.get("temperature"),
        "test": headline(test),
        "test_per_class_f1": {k: round(v["f1"], 4) for k, v in test["per_class"].items()},
        "test_confusion_matrix": test["confusion_matrix"],
        "labels": test["labels"],
        **timing,
        "test_images_per_second_predict": round(test["n"] / test_seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {args.load}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("val", "test")} | timing, indent=2))

    if args.ship:
        bundle.metrics = {"split": f"test: 10 % of PBC held out by bench/train_pbc.py (split sha256 "
                                   f"{results['split_file_sha256'][:16]})",
                          **{k: v for k, v in test.items() if k not in ("labels", "unknown_classes", "predictions")},
                          "val": headline(val_metrics), "calibration": val_metrics.get("calibration"),
                          "trust": val_metrics.get("trust")}
        bundle.config.training.split_file_sha256_full = results["split_file_sha256"]
        changes = ([" --frozen-bn"] * args.frozen_bn + [f" --norm {args.norm}"] * (args.norm != "batch")
                   + [f" --weights {args.weights}"] * (args.weights != RECIPE["weights"]))
        bundle.config.training.reproduce = "python bench/train_pbc.py --ship" + "".join(changes) + (
            f" --name {args.name} --epochs {timing.get('epochs', args.epochs)}" if changes else "")
        bundle.config.model.dtype = "float16"
        # size reference on 1,000 training images: a flagged crop framed 1.6x tighter than their median
        # also tries a padded frame of its size (PBC cut to its centre 40 %: 56 -> 83 %, PBC unchanged)
        bundle.set_reframe(REFRAME_ZOOMS, size_images=size_reference_images(table, bundle.preprocess))
        bundle.save(DEFAULT_MODEL)
        size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
        print(f"shipped {DEFAULT_MODEL} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
