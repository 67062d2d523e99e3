"""``hematoscope data``: inspect, check and split datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import console, err_console, user_errors

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
    group_by: Annotated[str, typer.Option(
        "--group-by", help="Column of group ids kept on one side (e.g. 'patient', the crops of one cell): 'auto' = "
                           "patient when that column has ids (as `train` does); 'none' splits images.")] = "auto",
    reader: ReaderOpt = None,
    kfold: Annotated[Optional[int], typer.Option("--kfold", help="Make K folds (fold_0..fold_K-1) instead of train/val/test.")] = None,
    exclude_outliers: Annotated[Optional[Path], typer.Option(
        "--exclude-outliers", metavar="REPORT",
        help="Leave out the images flagged in a `data check --outliers --json REPORT` report.")] = None,
    check: Annotated[Optional[Path], typer.Option(
        "--check", metavar="REPORT",
        help="A `data check --json REPORT` report of the same data: its unreadable files are left out and its "
             "exact and near duplicates kept on one side (a copy of a training image is never a test image). "
             "Without it, files that are plainly no image (by their header and end) are left out.")] = None,
) -> None:
    """Make a stratified, reproducible split file (with each file's sha256)."""
    from rich.table import Table

    from hematoscope.data.readers import read_dataset
    from hematoscope.data.samples import resolve_group_by
    from hematoscope.data.splits import kfold_split, make_split, save_split, unreadable_files

    import warnings

    notes: list[str] = []  # printed after the warnings the split itself raised
    with user_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        table = full = read_dataset(path, reader=reader)
        group_col = resolve_group_by(table, group_by)
        if group_by == "auto" and group_col is not None:
            console().print(f"grouped by {group_col} automatically: the data has {group_col} ids "
                            "(--group-by none splits images)", highlight=False)
        if exclude_outliers is not None:
            from hematoscope.trust.outliers import exclude, flagged_paths

            flagged = flagged_paths(exclude_outliers)
            table, dropped = exclude(table, flagged)
            console().print(f"left out {dropped} of the {len(flagged)} images flagged in {exclude_outliers}",
                            highlight=False)
            if flagged and not dropped:
                err_console().print(f"[yellow]warning:[/] none of the flagged images is in {path}: was the report "
                                    "made for another dataset?")
        if check is not None:
            import json
            import os

            from hematoscope.data.splits import check_report_mismatch, duplicate_clusters, split_keeping_together

            report = json.loads(check.read_text())
            why = check_report_mismatch(report, full, path)
            if why is not None:
                raise ValueError(f"{check} is a `data check` report of {report.get('source', 'other data')}, not of "
                                 f"{os.path.abspath(path)}: {why}; make one with `hematoscope data check {path} "
                                 "--json REPORT`")
            bad = {os.path.abspath(u["path"]) for u in report.get("unreadable", [])}
            keep = [os.path.abspath(p) not in bad for p in table["path"]]
            clusters = duplicate_clusters(report)
            fractions = {} if kfold is not None else {"val": val, "test": test}
            df, moved = split_keeping_together(table[keep].reset_index(drop=True), clusters, group_by=group_col,
                                               kfold=kfold, seed=seed, **fractions)
            console().print(f"{check}: left out {len(keep) - sum(keep)} unreadable files; {len(clusters)} clusters of "
                            f"copies kept on one side ({moved} {'groups merged' if group_col else 'images moved'})",
                            highlight=False)
            crossed = [d for d in report.get("exact_duplicates", []) + report.get("near_duplicates", [])
                       if d.get("cross_class")]
            if crossed:  # one image under two labels: one of them is wrong, and only the user can say which
                first = crossed[0]
                pair = first.get("paths") or [first["a"], first["b"]]
                n = len(crossed)
                notes.append(f"{n} image{'s' if n != 1 else ''} in the data under two labels (e.g. "
                             f"{' = '.join(Path(x).name for x in pair[:2])}): the copies are kept, on one side; "
                             "remove the wrongly labelled one from the data")
        else:
            bad = unreadable_files(table["path"])
            if bad:
                table = table[~table["path"].isin(list(bad))].reset_index(drop=True)
                first = sorted(bad)[0]
                notes.append(f"left out {len(bad)} file{'s' if len(bad) != 1 else ''} that cannot be read as "
                             f"images (e.g. {first}: {bad[first]}); `hematoscope data check` lists them all")
            if kfold is not None:
                df = kfold_split(table, k=kfold, seed=seed, group_by=group_col)
            else:
                df = make_split(table, val=val, test=test, seed=seed, group_by=group_col)
        save_split(df, out)
    for w in [*notes, *{str(w.message) for w in caught if issubclass(w.category, UserWarning)}]:
        err_console().print(f"[yellow]warning:[/] {w}", highlight=False)
    counts = df.groupby(["label", "split"]).size().unstack(fill_value=0)
    summary = Table("label", *counts.columns, title=f"{len(df)} images → {out}")
    for label, row in counts.iterrows():
        summary.add_row(str(label), *(str(v) for v in row))
    summary.add_row("[bold]total", *(f"[bold]{v}" for v in counts.sum()))
    console().print(summary)
    if group_col and group_col in df and df[group_col].notna().any():
        console().print(f"{df[group_col].nunique()} {group_col} groups, each on one side only.")


@data_app.command("check")
def check_cmd(
    path: Annotated[Path, typer.Argument(help="Dataset folder, file or split CSV to check.")],
    reader: ReaderOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON here.")] = None,
    workers: Annotated[int, typer.Option(help="Processes for decoding and hashing.")] = 2,
    near: Annotated[int, typer.Option(help="Near-duplicate threshold: max differing bits of 64 (0 = off).")] = 4,
    limit: Annotated[int, typer.Option(help="Rows shown per problem table (the JSON has all).")] = 20,
    outliers: Annotated[bool, typer.Option(
        "--outliers", help="Also rank the images by how unlike blood-cell crops they are (a model's OOD score) "
                           "and flag those past --outlier-cut.")] = False,
    outlier_cut: Annotated[str, typer.Option(
        "--outlier-cut", help="mad:K (K robust SDs above this dataset's median score), top:P (the P % highest), "
                              "bundle (the model's own OOD threshold) or a score.")] = "mad:4",
    outlier_model: Annotated[Optional[Path], typer.Option(
        "--outlier-model", help="Bundle whose OOD score ranks the images (default: the shipped model).")] = None,
    outlier_views: Annotated[int, typer.Option(
        "--outlier-views", help="Test-time views for the OOD score (1 is fastest).")] = 1,
) -> None:
    """Quality report: class counts, unreadable files, exact/near duplicates, sizes, imbalance.

    With --outliers, also images unlike blood-cell crops."""
    from hematoscope._io import write_json
    from hematoscope.data.quality import check_dataset

    with user_errors():
        cut = None
        if outliers:
            from hematoscope.trust.outliers import parse_cut

            cut = parse_cut(outlier_cut)  # a malformed cut fails before the long check
        report = check_dataset(path, reader=reader, workers=workers, near_threshold=near)
        if cut is not None:
            from hematoscope.bundle import load_bundle
            from hematoscope.trust.outliers import screen_outliers
            from hematoscope.data.readers import read_dataset
            from hematoscope.bundle.default import default_bundle_path

            bundle = load_bundle(outlier_model if outlier_model is not None else default_bundle_path())
            table = read_dataset(path, reader=reader)
            unreadable = {u["path"] for u in report.unreadable}
            table = table[~table["path"].isin(unreadable)]
            report.outliers = screen_outliers(table, bundle, cut=cut, views=outlier_views, workers=workers).to_dict()
    _print_report(report, path, limit)
    if json_out is not None:
        write_json(json_out, report.to_dict())
        console().print(f"report written to {json_out}")


def _print_report(report, root: Path, limit: int) -> None:
    from rich.table import Table

    from hematoscope.taxonomy import TAXONOMY

    out = console()
    base = root if root.is_dir() else root.parent

    def short(p: str) -> str:
        path = Path(p)
        return str(path.relative_to(base.resolve())) if path.is_relative_to(base.resolve()) else p

    d = report.to_dict()["summary"]
    summary = Table("check", "result", title=f"{report.source} (reader: {report.reader})", show_header=False)
    summary.add_row("image files", f"{d['files']:,}")
    summary.add_row("classes", str(d["classes"]))
    summary.add_row("unreadable", f"[{'red' if d['unreadable'] else 'green'}]{d['unreadable']}")
    summary.add_row("exact duplicates", f"{d['exact_duplicate_pairs']} byte-identical pairs in {d['exact_duplicate_groups']} groups")
    summary.add_row("near duplicates", f"{d['near_duplicate_pairs']} pairs (phash distance <= {report.near_threshold})")
    exact_x = sum(x["cross_class"] for x in report.exact_duplicates)
    near_x = sum(x["cross_class"] for x in report.near_duplicates)
    summary.add_row("across classes", f"[{'red' if exact_x + near_x else 'green'}]"
                    f"{exact_x} exact group{'s' * (exact_x != 1)}, {near_x} near pair{'s' * (near_x != 1)}")
    summary.add_row("imbalance ratio", f"{d['imbalance_ratio']} (largest / smallest class)")
    summary.add_row("edge bars", f"{d['edge_bars']} crops with black bars along an edge (cut past their slide "
                    "image; filled as background by models with Preprocess.bars = fill)" if d["edge_bars"] else "0")
    summary.add_row("blank", f"[red]{d['blank']} nearly uniform images (no cell to learn from; listed with --json)"
                    if d["blank"] else "0")
    summary.add_row("formats / modes", f"{report.formats} / {report.modes}")
    sizes = list(report.sizes.items())
    summary.add_row("sizes", ", ".join(f"{s}: {n}" for s, n in sizes[:5]) + (f", ... ({len(sizes)} sizes)" if len(sizes) > 5 else ""))
    summary.add_row("time", f"{d['seconds']:.1f} s")
    out.print(summary)

    classes = Table("label", "images", "canonical", title="readable images per class")
    unmapped = {lab for labs in report.unmapped_labels.values() for lab in labs}
    for label, n in report.class_counts.items():
        canon = "[red]unmapped" if label in unmapped else (TAXONOMY.canonical(report.reader, label) or "")
        classes.add_row(label, f"{n:,}", canon)
    out.print(classes)

    if report.unreadable:
        bad = Table("file", "reason", title=f"unreadable files ({len(report.unreadable)})")
        for u in report.unreadable[:limit]:
            bad.add_row(short(u["path"]), u["reason"])
        out.print(bad)
    dups = report.exact_duplicates + report.near_duplicates
    if dups:
        table = Table("files", "labels", "kind", title=f"duplicates (cross-class first; {len(dups)} in all)")
        for dup in dups[:limit]:
            files = dup["paths"] if "paths" in dup else [dup["a"], dup["b"]]
            labels = dup["labels"] if "labels" in dup else [dup["label_a"], dup["label_b"]]
            kind = "identical" if "paths" in dup else f"near (d={dup['distance']})"
            style = "[red]" if dup["cross_class"] else ""
            table.add_row((" = " if "paths" in dup else " ≈ ").join(short(f) for f in files), style + " / ".join(labels), kind)
        out.print(table)
    if report.outliers is not None:
        o = report.outliers
        flagged = [r for r in o["ranked"] if r["flagged"]]
        views = f"{o['views']} view{'s' if o['views'] > 1 else ''}"
        table = Table("file", "label", "score", title=(
            f"outliers: {len(flagged)} of {o['n_scored']} images past the cut {o['cut']} "
            f"(score > {o['threshold']:.3g}; {o['method']} of {o['model']}, {views})"))
        for r in flagged[:limit]:
            table.add_row(short(r["path"]), r["label"], f"{r['score']:.2f}")
        out.print(table)
        if len(flagged) > limit:
            out.print(f"... and {len(flagged) - limit} more (--json writes them all, with every image's score)")


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
