"""``hematoscope features`` (cached backbone features) and ``hematoscope embed`` (UMAP view)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import console, err_console, user_errors

BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="timm model name (e.g. efficientnet_lite0, "
                                          "vit_small_patch14_dinov2), hf-hub:org/name, or a bundle path.")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", "-w", help="Backbone weights: a .safetensors/.pth "
                                                   "file, an https URL, hf-hub:org/name, 'timm', 'imagenet-offline' or "
                                                   "'hematoscope-simclr-pbc' (the default for efficientnet_lite0: "
                                                   "blood-cell SimCLR weights shipped in the package).")]
SizeOpt = Annotated[int, typer.Option("--size", min=8, help="Input side in pixels (timm backbones).")]
TtaOpt = Annotated[bool, typer.Option("--tta/--no-tta", help="Average features over the 8 flip/rot90 views.")]


def features(
    data: Annotated[Path, typer.Argument(help="Dataset folder or split CSV.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (features.npy + index.csv).")],
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = 224,
    tta: TtaOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 32,
) -> None:
    """Extract backbone features for every image (cached: reruns only hash the files)."""
    with user_errors():
        from hematoscope import _io
        from hematoscope.data.readers import read_dataset
        from hematoscope.fewshot.features import load_extractor

        table = read_dataset(data)
        ext = load_extractor(backbone, weights=weights, size=size, tta=tta, batch_size=batch_size)
        fs = ext.extract(list(table["path"]))
        import numpy as np

        index = table[fs.ok].reset_index(drop=True)
        with _io.atomic_dir(out) as d:
            np.save(d / "features.npy", fs.features)
            index.to_csv(d / "index.csv", index=False)
            _io.write_json(d / "extractor.json", {"extractor": ext.describe(), "identity": ext.identity,
                                                  "preprocess": ext.preprocess.to_dict(), "views": ext.views,
                                                  "skipped": [s.__dict__ for s in fs.skipped]})
    console().print(f"{len(index)} feature vectors of dimension {fs.features.shape[1] if len(index) else 0} → "
                    f"{out} ({fs.computed} computed, {len(index) - fs.computed} from cache)")
    for s in fs.skipped:
        err_console().print(f"skipped {s}", highlight=False)


def embed(
    data: Annotated[list[Path], typer.Argument(help="One or more dataset folders or split CSVs.",
                                               show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG (coordinates go to the same name .csv).")],
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = 224,
    tta: TtaOpt = False,
    max_per_dataset: Annotated[int, typer.Option("--max-per-dataset", min=4, help="Random images kept per "
                                                 "dataset (bounds time).")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsample and of UMAP.")] = 0,
) -> None:
    """UMAP of backbone features, coloured by class (and by dataset when several are given)."""
    with user_errors():
        import pandas as pd

        from hematoscope import _io
        from hematoscope.data.readers import read_dataset
        from hematoscope.data.samples import class_column
        from hematoscope.fewshot.embed import plot_embedding, umap_coordinates
        from hematoscope.fewshot.features import load_extractor

        parts = []
        for src in data:
            t = read_dataset(src)
            if len(t) > max_per_dataset:
                t = t.sample(n=max_per_dataset, random_state=seed).sort_values("path")
            t = t.assign(cls=class_column(t), source=src.name)
            parts.append(t)
        table = pd.concat(parts, ignore_index=True)
        ext = load_extractor(backbone, weights=weights, size=size, tta=tta)
        fs = ext.extract(list(table["path"]))
        table = table[fs.ok].reset_index(drop=True)
        coords = umap_coordinates(fs.features, seed=seed)
        plot_embedding(coords, table["cls"].tolist(), table["source"].tolist(), out, title=backbone)
        csv = out.with_suffix(".csv")
        _io.write_text(csv, pd.DataFrame({"path": table["path"], "class": table["cls"], "dataset": table["source"],
                                          "x": coords[:, 0], "y": coords[:, 1]}).to_csv(index=False))
    console().print(f"{len(table)} images → {out} and {csv}")


def register(app: typer.Typer) -> None:
    app.command("features")(features)
    app.command("embed")(embed)
