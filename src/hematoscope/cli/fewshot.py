"""``hematoscope fewshot fit|bench`` (heads on frozen features) and ``hematoscope ssl``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import console, user_errors
from hematoscope.cli.features import BackboneOpt, SizeOpt, TtaOpt, WeightsOpt

fewshot_app = typer.Typer(help="Few labels: heads on frozen backbone features.", no_args_is_help=True)


@fewshot_app.command("fit")
def fit(
    data: Annotated[Path, typer.Argument(help="Labelled dataset folder or split CSV.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory or .zip to write.")],
    labels_per_class: Annotated[Optional[int], typer.Option("--labels-per-class", "-n", min=1,
                                                            help="Labels drawn per class (default: all).")] = None,
    head: Annotated[str, typer.Option("--head", help="lr, svm, svm-rbf, knn or proto; append +self for "
                                      "self-training on the unused images as unlabelled data.")] = "lr",
    transform: Annotated[str, typer.Option("--transform", help="standard, power or none.")] = "standard",
    pca: Annotated[Optional[float], typer.Option("--pca", help="PCA components (>= 1) or variance fraction "
                                                 "(< 1) after the transform.")] = None,
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = 224,
    tta: TtaOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the label draw.")] = 0,
    name: Annotated[Optional[str], typer.Option("--name", help="Bundle name.")] = None,
) -> None:
    """Fit a head on frozen features of a few labels per class and save it as a bundle.

    Images not drawn for training give a validation draw for calibration and the
    out-of-distribution threshold (skipped, with the reason recorded, when too few remain).
    """
    with user_errors():
        from hematoscope.data.readers import read_dataset
        from hematoscope.fewshot.bundle import fit_fewshot_bundle
        from hematoscope.fewshot.features import load_extractor
        from hematoscope.fewshot.heads import HeadSpec

        import dataclasses

        spec = dataclasses.replace(HeadSpec.parse(head), transform=transform,
                                   pca=None if pca is None else (int(pca) if pca >= 1 else pca))
        table = read_dataset(data)
        ext = load_extractor(backbone, weights=weights, size=size, tta=tta)
        bundle, report = fit_fewshot_bundle(table, ext, labels_per_class=labels_per_class,
                                            head=spec, seed=seed, name=name)
        bundle.save(out)
    c = console()
    c.print(f"fitted {spec.name} on {report['n_train']} images ({len(bundle.labels)} classes) in "
            f"{report['head_fit_seconds']:.2f} s (features {report['extract_seconds']:.1f} s) → {out}")
    if report["short_classes"]:
        c.print(f"classes with fewer images than asked (all used): {report['short_classes']}")
    if "val_balanced_accuracy" in report:
        c.print(f"validation balanced accuracy {report['val_balanced_accuracy']:.3f}")
    else:
        c.print(f"[yellow]{report['trust']['skipped']}[/]")


@fewshot_app.command("bench")
def bench(
    train: Annotated[Path, typer.Argument(help="Dataset the labels are drawn from.", show_default=False)],
    test: Annotated[Optional[Path], typer.Option("--test", help="Test dataset (may be another dataset; classes "
                                                 "matched through the taxonomy). Default: a held-out part "
                                                 "of TRAIN.")] = None,
    shots: Annotated[str, typer.Option("--shots", help="Labels per class, comma-separated; 'all' = every "
                                       "training image.")] = "1,5,10,20,50,100,all",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Random draws per shot count.")] = 5,
    heads: Annotated[str, typer.Option("--heads", help="Comma-separated head names.")] = "lr,svm,knn",
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    size: SizeOpt = 224,
    tta: TtaOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and the draws.")] = 0,
    max_test: Annotated[int, typer.Option("--max-test", min=1, help="Largest held-out test part "
                                          "(stratified subsample).")] = 2000,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full results as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the learning curve PNG.")] = None,
) -> None:
    """Balanced accuracy and macro-F1 (mean ± sd over draws) per number of labels and head."""
    with user_errors():
        from hematoscope import _io
        from hematoscope.data.readers import read_dataset
        from hematoscope.fewshot.bench import plot_curve, results_table, run_benchmark
        from hematoscope.fewshot.features import load_extractor
        from hematoscope.fewshot.shots import parse_shots

        shot_counts = parse_shots(shots)
        train_table, test_table = read_dataset(train), read_dataset(test) if test else None
        ext = load_extractor(backbone, weights=weights, size=size, tta=tta)
        result = run_benchmark(train_table, ext, test=test_table,
                               shots=shot_counts, heads=[h.strip() for h in heads.split(",")],
                               repeats=repeats, seed=seed, max_test=max_test)
        if json_out:
            _io.write_json(json_out, result)
        if plot:
            plot_curve(result, plot)
    c = console()
    c.print(f"balanced accuracy on {result['n_test']} test images ({result['test_source']}); "
            f"classes scored: {', '.join(result['classes_scored'])}")
    if result["unmatched_test_classes"] or result["unmatched_train_classes"]:
        c.print(f"not scored: test classes {result['unmatched_test_classes']}, "
                f"train-only classes {result['unmatched_train_classes']}")
    c.print(results_table(result), markup=False)


def ssl(
    data: Annotated[list[Path], typer.Argument(help="Image folders, dataset folders or split CSVs (labels unused).",
                                               show_default=False)],
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
) -> None:
    """Self-supervised adaptation of a backbone to unlabelled cell images, time-bounded.

    Use the result with ``--backbone ARCH --weights OUT`` in features / fewshot / train.
    """
    with user_errors():
        from hematoscope.data.readers import read_dataset
        from hematoscope.fewshot.ssl import loss_trend, save_backbone, train_ssl
        from hematoscope.models.backbones import OFFLINE_WEIGHTS

        paths = [p for src in data for p in read_dataset(src)["path"]]
        start = weights or (OFFLINE_WEIGHTS if arch == "efficientnet_lite0" else None)
        res = train_ssl(paths, method=method, arch=arch, weights=start, size=size, batch_size=batch_size,
                        minutes=minutes, max_steps=max_steps, lr=lr, seed=seed, num_workers=workers)
        save_backbone(res.backbone, out, res.meta)
    first, last = loss_trend(res.losses, window=20)
    console().print(f"{method}: {res.steps} steps in {res.seconds:.0f} s on {len(paths)} images; loss "
                    f"{first:.3f} → {last:.3f}; backbone → {out} (use --backbone {arch} --weights {out})")


def register(app: typer.Typer) -> None:
    app.add_typer(fewshot_app, name="fewshot")
    app.command("ssl")(ssl)
