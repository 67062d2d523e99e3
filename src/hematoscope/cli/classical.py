"""``hematoscope classical``: segmentation, named features, XGBoost bundles and their explanations."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import OverwriteOption, check_out, console, user_errors, warn_unknown_labels

classical_app = typer.Typer(help="Classical pipeline: segmentation, named features, XGBoost, explanations.",
                            no_args_is_help=True)


@classical_app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Dataset folder or split CSV (train + val rows used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory (or .zip) to write.")],
    val: Annotated[float, typer.Option(help="Validation fraction when DATA has no split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split, XGBoost and the IsolationForest.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Feature-extraction processes.")] = 2,
    name: Annotated[str, typer.Option(help="Bundle name.")] = "classical",
    reader: Annotated[Optional[str], typer.Option(help="Dataset reader (default: auto-detect).")] = None,
    fold: Annotated[Optional[int], typer.Option(min=0, help="Of a k-fold split file: the fold that validates "
                                                "(the others train).")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Extract features, train class-weighted XGBoost with early stopping, fit the anomaly flag."""
    from hematoscope.classical.model import train_classical
    from hematoscope.data.readers import read_dataset

    check_out(out, overwrite)  # before minutes of feature extraction
    with user_errors():
        table = read_dataset(data, reader=reader)
        warn_unknown_labels(table, "each made a class of the model")
        result = train_classical(table, val=val, seed=seed, n_jobs=jobs, name=name, progress=True, fold=fold)
        result.bundle.save(out)
    r = result.report
    c = console()
    c.print(f"{len(r['labels'])} classes, {r['n_train']} train / {r['n_val']} val images"
            + (f", {r['unreadable']} unreadable skipped" if r["unreadable"] else ""))
    c.print(f"features {r['feature_seconds']:.0f} s, XGBoost {r['train_seconds']:.0f} s ({r['rounds']} rounds)")
    v = r["val"]
    c.print(f"val: accuracy {v['accuracy']:.4f}, weighted F1 {v['f1_weighted']:.4f}, macro F1 {v['f1_macro']:.4f}")
    c.print(f"anomaly flag: isolation_forest, accepts {r['trust']['val_ood_accept_rate']:.1%} of val")
    c.print(f"saved {out}")


@classical_app.command("segment")
def segment_cmd(
    image: Annotated[Path, typer.Argument(metavar="IMG", help="Single-cell image.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Overlay PNG to write (cell yellow, nucleus cyan).")],
) -> None:
    """Segment the centre cell and write a debug overlay of the nucleus and cell contours."""
    from hematoscope import _io
    from hematoscope.classical.bundle import classical_preprocess
    from hematoscope.classical.segment import overlay_png, segment_cell
    from hematoscope.data.images import load_model_image

    with user_errors():
        seg = segment_cell(load_model_image(image, classical_preprocess()))  # as classical bundles see it
        _io.write_bytes(out, overlay_png(seg))
    c = console()
    if seg.ok:
        c.print(f"ok: nucleus {int(seg.nucleus.sum())} wpx², cell {int(seg.cell.sum())} wpx² "
                f"(working image {seg.image.shape[1]}x{seg.image.shape[0]})")
    else:
        c.print(f"[yellow]segmentation failed:[/] {seg.reason}")
    c.print(f"saved {out}")


@classical_app.command("explain")
def explain_cmd(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Classical bundle directory or .zip.")],
    image: Annotated[Path, typer.Argument(metavar="IMG", help="Single-cell image.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for features.json, lime.png, importance.png.")],
    top: Annotated[int, typer.Option(help="Number of top features listed.")] = 10,
    samples: Annotated[int, typer.Option(help="LIME perturbations (each is one prediction).")] = 300,
) -> None:
    """Top contributing features (SHAP), a LIME superpixel map and the global importance plot."""
    import numpy as np

    from hematoscope import _io
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.images import load_image, load_model_image
    from hematoscope.explain.lime import bundle_predict_fn, explain_image
    from hematoscope.explain.shap import explain_features, importance_png

    with user_errors():
        bundle = load_bundle(bundle_path)
        img = load_model_image(image, bundle.preprocess)  # the pixels `predict` classifies
        pred = bundle.predict_arrays([img], [str(image)])
        label = pred.predicted[0]
        rows = explain_features(bundle, img, label=label, top=top)
        # LIME over the crop as it is (at most 512 px a side), so its overlay has the crop's shape,
        # not the model's square input; the bundle resizes each perturbed copy as it does any image
        crop = load_image(image)
        if max(crop.shape[:2]) > 512:
            from PIL import Image

            k = 512 / max(crop.shape[:2])
            crop = np.asarray(Image.fromarray(crop).resize((max(1, round(crop.shape[1] * k)),
                                                            max(1, round(crop.shape[0] * k))), Image.Resampling.BOX))
        _, png = explain_image(bundle_predict_fn(bundle), crop, bundle.labels.index(label), num_samples=samples)
        out.mkdir(parents=True, exist_ok=True)
        _io.write_json(out / "features.json", {
            "image": str(image), "predicted": label, "confidence": float(pred.confidence[0]),
            "ood_flag": bool(pred.ood_flag[0]), "abstain": bool(pred.abstain[0]),
            "abstain_reason": pred.abstain_reason[0], "contribution_space": "XGBoost margin (log-odds) of the predicted class",
            "features": [r._asdict() for r in rows]})
        _io.write_bytes(out / "lime.png", png)
        _io.write_bytes(out / "importance.png", importance_png(bundle))
    c = console()
    c.print(f"{image.name}: {label} ({pred.confidence[0]:.1%})"
            + (f" [yellow]set aside: {pred.abstain_reason[0]}[/]" if pred.abstain[0] else ""))
    for r in rows:
        value = "missing" if r.value is None else f"{r.value:.4g} {r.unit}"
        c.print(f"  {r.contribution:+.3f}  {r.name} = {value}")
    c.print(f"saved {out}/features.json, lime.png, importance.png")


def register(app: typer.Typer) -> None:
    app.add_typer(classical_app, name="classical")
