"""``hematoscope fewshot fit|bench`` (heads on frozen features) and ``hematoscope ssl``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import (OverwriteOption, bundle_name, check_out, console, err_console, user_errors,
                                     warn_unknown_labels)
from hematoscope.cli.features import SizeOpt, WeightsOpt

fewshot_app = typer.Typer(help="Few labels: heads on frozen backbone features.", no_args_is_help=True)


#: The default recipe (docs/fewshot.md): the shipped blood-cell SimCLR Lite0, 224 px, 8 views,
#: a linear SVM with self-training on up to 400 unlabelled images per class.
DEFAULT_HEAD = "svm+self"
RECIPE_VIEWS = 8

FewshotBackboneOpt = Annotated[str, typer.Option(
    "--backbone", "-b", help="timm model name (default efficientnet_lite0 with the shipped blood-cell SimCLR "
    "weights), hf-hub:org/name, a bundle path (e.g. made by `hematoscope adapt`), or 'default' (the shipped "
    "model): a bundle gives its penultimate features with its own preprocessing and views.")]
FewshotTtaOpt = Annotated[Optional[bool], typer.Option(
    "--tta/--no-tta", help="Average features over the 8 flip/rot90 views (--tta) or use 1 (--no-tta). "
    "Default: 8, the measured recipe, for bundle backbones too.", show_default=False)]
ViewsOpt = Annotated[Optional[int], typer.Option("--views", help="Views per image: 1, 2, 4 or 8 (overrides "
                                                 "--tta).", show_default=False)]
GroupByOpt = Annotated[str, typer.Option("--group-by", help="Column grouping images that must stay together "
                                         "(e.g. the crops of one cell): labels count groups and no group is "
                                         "on both sides. 'auto' = patient when that column has ids; 'none'.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto (ONNX Runtime when it passes its parity "
                                         "check), onnx or torch.")]


def _extractor(backbone: str, weights: str | None, size: int, tta: bool | None, views: int | None,
               backend: str):
    from hematoscope.fewshot.features import load_extractor

    n = views if views is not None else tta
    # 8 views for a bundle backbone too: on another lab's cells (LISC, 10 cells per class) the
    # default model's features gave macro-F1 0.93 with its own 1 view and 0.97 with 8 (docs/fewshot.md)
    return load_extractor(backbone, weights=weights, size=size, views=RECIPE_VIEWS if n is None else n,
                          backend=backend)


def _test_rows(table) -> int:
    """How many test rows a split file's table has (0 for any other table)."""
    from hematoscope.data.splits import split_parts

    test = split_parts(table)[1]
    return 0 if test is None else len(test)


def _add_unlabelled(table, paths: list[str], split_files: list[str]):
    """``table`` with a row without label for each image file among ``paths`` and each row of a
    CSV among them (a split file's rows keep their ``split``, so its test rows are left out like
    DATA's; noted in ``split_files``); what cannot be used (missing paths, zip members) is
    reported on stderr."""
    import pandas as pd

    from hematoscope.cli._common import err_console
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.samples import COLUMNS
    from hematoscope.data.sources import ImageSource, SkippedFile, expand_paths

    csvs = [p for p in paths if str(p).lower().endswith(".csv") and Path(p).is_file()]
    parts = [read_dataset(Path(p)).assign(label=None, canonical=None) for p in csvs]
    split_files += [str(p) for p, part in zip(csvs, parts) if _test_rows(part)]
    files, skipped = [], []
    for item in expand_paths([p for p in paths if p not in csvs]):
        if isinstance(item, ImageSource) and item.path is not None and item.member is None:
            files.append(str(item.path))
        elif isinstance(item, SkippedFile):
            skipped.append(str(item))
        else:
            skipped.append(f"{item.name}: zip members are not read here; unzip them first")
    if not files and not any(len(part) for part in parts):
        raise typer.BadParameter("no image file among these paths" + (f" ({'; '.join(skipped[:3])})" if skipped else ""),
                                 param_hint="--unlabelled")
    for line in skipped:
        err_console().print(f"--unlabelled: skipped {line}", highlight=False)
    rows = pd.DataFrame({"path": files, "label": None, "canonical": None, "patient": None, "dataset": "unlabelled"},
                        columns=COLUMNS)
    # a file DATA holds already (its unused images are unlabelled data too), or one named twice, is
    # not a second image; copies of DATA's test rows stay, to be left out and counted with them
    extra = pd.concat([*parts, rows], ignore_index=True)
    pool = table if "split" not in table else table[table["split"] != "test"]
    where = extra["path"].astype(str).map(os.path.abspath)
    keep = ~where.isin(set(pool["path"].astype(str).map(os.path.abspath))) & ~where.duplicated()
    return pd.concat([table, extra[keep.to_numpy()]], ignore_index=True)


def _check_views(views: int | None) -> None:
    from hematoscope.fewshot.features import view_count

    view_count(views)  # raises FeatureError (a ValueError) before any data is read


@fewshot_app.command("fit")
def fit(
    data: Annotated[Path, typer.Argument(help="Labelled dataset folder or split CSV (train + val rows used).",
                                         show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory or .zip to write.")],
    labels_per_class: Annotated[Optional[int], typer.Option("--labels-per-class", "-n", min=1,
                                                            help="Labels drawn per class (default: all).")] = None,
    head: Annotated[str, typer.Option("--head", help="lr, svm, svm-rbf, knn or proto; append +self for "
                                      "self-training on the unused images as unlabelled data.")] = DEFAULT_HEAD,
    transform: Annotated[str, typer.Option("--transform", help="standard, power or none.")] = "standard",
    pca: Annotated[Optional[float], typer.Option("--pca", help="PCA components (>= 1) or variance fraction "
                                                 "(< 1) after the transform.")] = None,
    backbone: FewshotBackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = 224,
    tta: FewshotTtaOpt = None,
    views: ViewsOpt = None,
    unlabelled_per_class: Annotated[int, typer.Option("--unlabelled-per-class", min=0, help="+self heads: unused "
                                                      "images per class given without labels.")] = 400,
    unlabelled: Annotated[Optional[list[str]], typer.Option(
        "--unlabelled", help="The lab's own unlabelled crops (files, folders, globs or CSVs, labels unused; a split "
                             "file: its train + val rows; repeatable): +self heads learn from them too. Rows of a "
                             "CSV with a blank label count as such.")] = None,
    group_by: GroupByOpt = "auto",
    backend: BackendOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the label draw.")] = 0,
    name: Annotated[Optional[str], typer.Option("--name", help="Bundle name (default: --out's name).")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fit a head on frozen features of a few labels per class and save it as a bundle.

    Images not drawn for training give a validation draw for calibration and the
    out-of-distribution threshold (skipped, with the reason recorded, when too few remain).
    """
    with user_errors():
        from hematoscope.data.readers import read_dataset
        from hematoscope.fewshot.bundle import fit_fewshot_bundle
        from hematoscope.fewshot.heads import HeadSpec

        import dataclasses

        _check_views(views)
        check_out(out, overwrite)
        spec = dataclasses.replace(HeadSpec.parse(head), transform=transform,
                                   pca=None if pca is None else (int(pca) if pca >= 1 else pca))
        table = read_dataset(data)
        split_files = [str(data)] if _test_rows(table) else []
        warn_unknown_labels(table, "each made a class of the head")
        if unlabelled:
            table = _add_unlabelled(table, unlabelled, split_files)
        ext = _extractor(backbone, weights, size, tta, views, backend)
        bundle, report = fit_fewshot_bundle(table, ext, labels_per_class=labels_per_class, head=spec, seed=seed,
                                            name=name or bundle_name(out), unlabelled_per_class=unlabelled_per_class or None,
                                            group_by=group_by)
        bundle.save(out)
    c = console()
    if split_files:  # as `fewshot bench` and `classical train`: a split file's test rows stay unseen
        also = (f"; also {report['n_overlap_left_out']} images sharing a file or group with them"
                if report["n_overlap_left_out"] else "")
        c.print(f"train + val rows of {', '.join(split_files)} used; {report['n_test_left_out']} test rows left "
                f"out (neither drawn nor self-trained on){also}", highlight=False)
    c.print(f"fitted {spec.label} on {report['n_train']} images ({len(bundle.labels)} classes, "
            f"{ext.views} view{'s' if ext.views > 1 else ''}) in {report['head_fit_seconds']:.2f} s "
            f"(features {report['extract_seconds']:.1f} s) → {out}")
    if report["n_unlabelled"]:
        c.print(f"self-trained on {report['n_unlabelled']} images without labels")
    if report["skipped"]:
        err_console().print(f"{len(report['skipped'])} drawn image(s) could not be read and were left out: "
                            + "; ".join(report["skipped"][:5]) + ("; ..." if len(report["skipped"]) > 5 else ""),
                            highlight=False, soft_wrap=True)  # paths unbroken
    if report["short_classes"]:
        c.print("classes with fewer labels than asked (all their readable images used): "
                + ", ".join(f"{k} {v}" for k, v in report["short_classes"].items()), highlight=False)
    if "val_balanced_accuracy" in report:
        c.print(f"validation balanced accuracy {report['val_balanced_accuracy']:.3f}")
    else:
        short = ", ".join(f"{k} {v}" for k, v in report["val_short"].items())
        c.print(f"too few labelled images left over to validate on ({short}; 5 per class needed); calibration "
                f"and the out-of-distribution threshold: {report['trust']['split']}", highlight=False)


@fewshot_app.command("bench")
def bench(
    train: Annotated[Path, typer.Argument(help="Dataset the labels are drawn from (a split file: its train/val "
                                          "rows; its test rows are the default test set).", show_default=False)],
    test: Annotated[Optional[Path], typer.Option("--test", help="Test dataset (may be another dataset; classes "
                                                 "matched through the taxonomy; a split file: its test rows). "
                                                 "Default: a held-out part of TRAIN.")] = None,
    shots: Annotated[str, typer.Option("--shots", help="Labels per class, comma-separated; 'all' = every "
                                       "image of the pool.")] = "1,5,10,20,50",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Random draws per shot count.")] = 5,
    heads: Annotated[str, typer.Option("--heads", help="Comma-separated head names (lr, svm, svm-rbf, knn, "
                                       "proto; +self = self-training on the rest of the pool).")] = DEFAULT_HEAD,
    backbone: FewshotBackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = 224,
    tta: FewshotTtaOpt = None,
    views: ViewsOpt = None,
    pool_per_class: Annotated[int, typer.Option("--pool-per-class", min=0, help="Draw labels from (and use the "
                                                "rest as unlabelled images of) a fixed random subset of this "
                                                "many images per class; 0 = all.")] = 400,
    group_by: GroupByOpt = "auto",
    backend: BackendOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and the draws.")] = 0,
    max_test: Annotated[int, typer.Option("--max-test", min=1, help="Largest held-out test part "
                                          "(stratified subsample).")] = 2000,
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="Head fits in parallel (default: "
                                                "the CPU cores).", show_default=False)] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full results as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the learning curve PNG.")] = None,
) -> None:
    """Balanced accuracy and macro-F1 (mean ± sd over draws) per number of labels and head."""
    with user_errors():
        from hematoscope import _io
        from hematoscope.data.readers import read_dataset
        from hematoscope.fewshot.bench import plot_curve, results_table, run_benchmark
        from hematoscope.fewshot.shots import parse_shots

        shot_counts = parse_shots(shots)
        _check_views(views)
        train_table, test_table = read_dataset(train), read_dataset(test) if test else None
        ext = _extractor(backbone, weights, size, tta, views, backend)
        result = run_benchmark(train_table, ext, test=test_table,
                               shots=shot_counts, heads=[h.strip() for h in heads.split(",")],
                               repeats=repeats, seed=seed, max_test=max_test,
                               max_pool_per_class=pool_per_class or None, group_by=group_by, n_jobs=jobs)
        if json_out:
            _io.write_json(json_out, result)
        if plot:
            plot_curve(result, plot)
    c = console()
    grouped = f", grouped by {result['group_by']}" if result["group_by"] else ""
    c.print(f"balanced accuracy on {result['n_test']} test images ({result['test_source']}{grouped}); "
            f"classes scored: {', '.join(result['classes_scored'])}")
    c.print(f"{result['views']} view{'s' if result['views'] > 1 else ''}, {result['backend']}; features "
            f"{result['extract_seconds']:.0f} s ({result['features_computed']} computed), fits "
            f"{result['fit_seconds']:.0f} s, total {result['seconds']:.0f} s")
    if result["unmatched_test_classes"] or result["unmatched_train_classes"]:
        c.print(f"not scored: test classes {result['unmatched_test_classes']}, "
                f"train-only classes {result['unmatched_train_classes']}")
    c.print(results_table(result), markup=False)


def ssl(
    data: Annotated[list[Path], typer.Argument(help="Image folders, dataset folders or split CSVs (labels unused; a "
                                               "split file: its train + val rows).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Backbone weights file to write (.safetensors).")],
    method: Annotated[str, typer.Option("--method", help="simclr or dino.")] = "simclr",
    arch: Annotated[str, typer.Option("--arch", help="timm architecture.")] = "efficientnet_lite0",
    weights: Annotated[Optional[str], typer.Option("--weights", help="Start weights (default: offline ImageNet "
                                                   "for efficientnet_lite0, else random).")] = None,
    minutes: Annotated[float, typer.Option("--minutes", min=0.05, help="Wall-clock budget.")] = 10.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Also stop after this many steps (-1: no limit).")] = -1,
    size: Annotated[int, typer.Option("--size", min=16, help="Training crop side.")] = 112,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Backbone learning rate.")] = 3e-4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding worker processes.")] = 1,
    devices: Annotated[str, typer.Option("--devices", help="Lightning devices per node; on CPU N > 1 trains in N "
                                         "processes (DDP, gloo; --batch-size is the global batch).")] = "1",
    num_nodes: Annotated[int, typer.Option("--num-nodes", min=1, help="Machines (docs/scale.md).")] = 1,
    strategy: Annotated[str, typer.Option("--strategy", help="Lightning strategy: auto or ddp.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the weights file --out already is.")] = False,
) -> None:
    """Self-supervised adaptation of a backbone to unlabelled cell images, time-bounded.

    Use the result with ``--backbone ARCH --weights OUT`` in features / fewshot / train.
    """
    if out.suffix != ".safetensors":  # what is read back is chosen by the name: .pt would be unpickled as torch's
        raise typer.BadParameter(f"the weights are written as safetensors: name the file *.safetensors, not "
                                 f"{out.name}", param_hint="--out")
    if out.exists() and not overwrite:  # minutes or hours of pretraining
        raise typer.BadParameter(f"{out} exists; choose another --out, or pass --overwrite to replace it",
                                 param_hint="--out")
    with user_errors():
        from hematoscope.data.readers import read_dataset
        from hematoscope.data.splits import split_parts
        from hematoscope.fewshot.ssl import loss_trend, save_backbone, train_ssl
        from hematoscope.models.backbones import OFFLINE_WEIGHTS

        parts = {src: split_parts(read_dataset(src)) for src in data}  # a split file's test rows stay unseen
        paths = [p for pool, _ in parts.values() for p in pool["path"]]
        left_out = {src: len(test) for src, (_, test) in parts.items() if test is not None}
        start = weights or (OFFLINE_WEIGHTS if arch == "efficientnet_lite0" else None)
        res = train_ssl(paths, method=method, arch=arch, weights=start, size=size, batch_size=batch_size,
                        minutes=minutes, max_steps=max_steps, lr=lr, seed=seed, num_workers=workers,
                        devices=int(devices) if devices.isdigit() else devices, num_nodes=num_nodes, strategy=strategy)
        if res.rank != 0:  # another process of a multi-process run: rank 0 saves and reports
            return
        save_backbone(res.backbone, out, res.meta)
    first, last = loss_trend(res.losses, window=20)
    if left_out:
        console().print(f"train + val rows of {', '.join(map(str, left_out))} used; {sum(left_out.values())} test "
                        "rows left out", highlight=False)
    console().print(f"{method}: {res.steps} steps in {res.seconds:.0f} s on {len(paths)} images; loss "
                    f"{first:.3f} → {last:.3f}; backbone → {out} (use --backbone {arch} --weights {out})")


def register(app: typer.Typer) -> None:
    app.add_typer(fewshot_app, name="fewshot")
    app.command("ssl")(ssl)
