"""``hematoscope evaluate``: score a bundle on a labelled dataset (taxonomy-aware)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import (ClassesOption, OodAcceptOption, RecolourOption, ReframeOption, TtaOption,
                                     class_list, console, err_console, user_errors)


def evaluate_cmd(
    bundle_path: Annotated[str, typer.Argument(metavar="BUNDLE", help="Bundle directory or .zip, or 'default' "
                                                                      "for the shipped model.")],
    data: Annotated[Path, typer.Argument(help="Labelled dataset folder (any reader) or split CSV.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON here.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write confusion matrix and reliability "
                                                                  "diagram PNGs into this folder.")] = None,
    ood: Annotated[Optional[Path], typer.Option("--ood", help="Images unlike the training data: also measure "
                                                              "out-of-distribution detection.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Rows of a split CSV to use: one of its parts (test, val, "
                                                      "train; fold_0, fold_1 ... of a k-fold file) or all (default: "
                                                      "test; a split file without test rows needs one named).")] = None,
    reader: Annotated[Optional[str], typer.Option(help="Dataset reader (default: auto-detect).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    tta: TtaOption = None,
    reframe: ReframeOption = None,
    recolour: RecolourOption = False,
    ood_accept: OodAcceptOption = None,
    classes: ClassesOption = None,
) -> None:
    """Accuracy, balanced accuracy, macro-F1, per-class scores, confusion matrix and calibration.

    DATA's labels are matched to the bundle's classes through the taxonomy; classes the bundle
    does not know are reported, not scored.
    """
    from rich.table import Table

    with user_errors():
        from hematoscope import _io
        from hematoscope.data.readers import read_dataset
        from hematoscope.data.splits import ALL_ROWS, SplitRowsError, select_split_rows
        from hematoscope.evaluate import evaluate_bundle
        from hematoscope.predict.options import InferenceOptions
        from hematoscope.predict.pipeline import load_for_inference

        # "default": the shipped model; the options as `predict` applies them
        bundle = load_for_inference(str(bundle_path), InferenceOptions(
            tta=tta, classes=class_list(classes), reframe=reframe, recolour=recolour, ood_accept=ood_accept))
        table = read_dataset(data, reader=reader)
        try:
            table, chosen = select_split_rows(table, split, data)
        except SplitRowsError as exc:
            raise typer.BadParameter(str(exc), param_hint=exc.param_hint) from None
        report = evaluate_bundle(bundle, table, batch_size=batch_size, plots_dir=plots)
        if ood is not None:
            from hematoscope.trust import evaluate_ood

            report["ood"] = evaluate_ood(bundle, table, ood, plots_dir=plots, batch_size=batch_size,
                                         rows=chosen or ALL_ROWS)
        if json_out is not None:  # what was scored: the model, the data by name, which rows
            _io.write_json(json_out, {"model": bundle.name, "data": Path(data).name, "rows": chosen or ALL_ROWS,
                                      **report})

    c = console()
    c.print(f"[bold]{bundle.name}[/] on {data}: {report['n']} images scored")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        c.print(f"  {key.replace('_', ' ')}: {report[key]:.4f}")
    if report.get("predicted_other_classes"):
        c.print(f"  answers naming a class DATA does not have: {report['predicted_other_classes']:.1%} (errors)")
    if report["accuracy_answered"] is not None:
        c.print(f"  abstained: {report['abstained']:.1%}; accuracy on the rest: {report['accuracy_answered']:.4f}")
    elif report.get("abstained"):  # every image set aside: the scores above are of answers nobody was given
        c.print(f"  abstained: {report['abstained']:.1%} (every image): the scores above are of the answers it "
                "set aside")
    if report.get("slow_share") is not None:
        c.print(f"  views: cascade, {report['slow_share']:.1%} of images took the slow path")
    elif report.get("views"):
        c.print(f"  views: {report['views']}")
    per_class = Table("class", "precision", "recall", "F1", "support")
    for lab, d in report["per_class"].items():
        per_class.add_row(lab, f"{d['precision']:.3f}", f"{d['recall']:.3f}", f"{d['f1']:.3f}", str(d["support"]))
    c.print(per_class)
    if report["merged"]:
        c.print("merged bundle classes: " + ", ".join(f"{b} → {m}" for b, m in report["merged"].items()))
    if report["unknown_classes"]:
        c.print("[yellow]not scored (classes the bundle does not know):[/] "
                + ", ".join(f"{k} ({v})" for k, v in sorted(report["unknown_classes"].items())))
    if report.get("seen_by_bundle"):
        err_console().print(f"[yellow]warning:[/] {report['seen_by_bundle']} of the {report['n']} images scored are "
                            f"images {bundle.name} learnt from or was calibrated on (its few-shot draws or "
                            "adaptation crops): these scores are not a test; evaluate on images kept aside")
    if report["skipped"]:
        c.print(f"[yellow]{len(report['skipped'])} unreadable file(s) skipped[/], e.g. "
                f"{report['skipped'][0]['source']} ({report['skipped'][0]['reason']})")
    if "ood" in report:
        o = report["ood"]
        c.print(f"OOD ({o.get('score')}): " + ", ".join(f"{k} {v:.4f}" for k, v in o.get("ood", {}).items()
                                                        if isinstance(v, float)))
    if plots is not None:
        c.print(f"plots: {plots}")
    if json_out is not None:
        c.print(f"report: {json_out}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
