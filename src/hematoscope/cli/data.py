"""``hematoscope data``: inspect, check and split datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import console, user_errors

data_app = typer.Typer(help="Datasets: list readers, quality check, splits, synthetic data.", no_args_is_help=True)

ReaderOpt = Annotated[Optional[str], typer.Option("--reader", "-r", help="Dataset reader (default: auto-detect); see `hematoscope data readers`.")]


@data_app.command("readers")
def readers_cmd() -> None:
    """List the dataset readers."""
    from rich.table import Table

    from hematoscope.data.readers import get_reader, list_readers

    table = Table("reader", "layout")
    for name in list_readers():
        doc = (get_reader(name).__doc__ or "").strip().splitlines()
        table.add_row(name, doc[0] if doc else "")
    console().print(table)


@data_app.command("split")
def split_cmd(
    path: Annotated[Path, typer.Argument(help="Dataset folder (or CSV) to split.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Split CSV to write.")],
    val: Annotated[float, typer.Option(help="Validation fraction.")] = 0.1,
    test: Annotated[float, typer.Option(help="Test fraction.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed (same seed → byte-identical file).")] = 0,
    group_by: Annotated[Optional[str], typer.Option("--group-by", help="Keep each group (e.g. 'patient') on one side.")] = None,
    reader: ReaderOpt = None,
    kfold: Annotated[Optional[int], typer.Option("--kfold", help="Make K folds (fold_0..fold_K-1) instead of train/val/test.")] = None,
) -> None:
    """Make a stratified, reproducible split file (with each file's sha256)."""
    from rich.table import Table

    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import kfold_split, make_split, save_split

    with user_errors():
        table = read_dataset(path, reader=reader)
        if kfold is not None:
            df = kfold_split(table, k=kfold, seed=seed, group_by=group_by)
        else:
            df = make_split(table, val=val, test=test, seed=seed, group_by=group_by)
        save_split(df, out)
    counts = df.groupby(["label", "split"]).size().unstack(fill_value=0)
    summary = Table("label", *counts.columns, title=f"{len(df)} images → {out}")
    for label, row in counts.iterrows():
        summary.add_row(str(label), *(str(v) for v in row))
    summary.add_row("[bold]total", *(f"[bold]{v}" for v in counts.sum()))
    console().print(summary)
    if group_by and group_by in df and df[group_by].notna().any():
        console().print(f"{df[group_by].nunique()} {group_by} groups, each on one side only.")


@data_app.command("synthetic")
def synthetic_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to create (class-per-folder).")],
    n_per_class: Annotated[int, typer.Option("--n", help="Images per class.")] = 20,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Generate a small synthetic cell dataset (for trying things offline; not real data)."""
    from hematoscope.data.synthetic import make_synthetic_dataset

    with user_errors():
        root = make_synthetic_dataset(out, n_per_class=n_per_class, size=size, seed=seed)
    console().print(f"wrote synthetic images to {root}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
