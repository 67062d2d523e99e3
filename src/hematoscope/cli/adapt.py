"""``hematoscope adapt``: adapt a model to a new lab from that lab's unlabelled cell crops."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import OverwriteOption, bundle_name, check_out, class_list, console, err_console, user_errors


def adapt(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", show_default=False,
                                                help="Model bundle to adapt (directory, .zip, or 'default').")],
    paths: Annotated[list[str], typer.Argument(metavar="IMAGES", show_default=False,
                                               help="The new lab's cell crops: files, folders, globs or zips "
                                                    "(a few hundred, no labels needed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the adapted bundle (directory or "
                                      ".zip).")],
    name: Annotated[Optional[str], typer.Option(help="Name of the adapted bundle, as the web app lists it (default: --out's name).")] = None,
    source: Annotated[Optional[str], typer.Option(help="What the images are, recorded in the bundle "
                                                  "(default: the first IMAGES argument's name).")] = None,
    target_tpr: Annotated[float, typer.Option("--accept", min=0.5, max=0.999,
                                              help="Share of the lab's own cells the out-of-distribution flag "
                                                   "accepts.")] = 0.95,
    mix: Annotated[Optional[float], typer.Option("--bn-mix", min=0.0, max=1.0,
                                                 help="Share of the lab's own BatchNorm statistics (0 = as "
                                                      "trained, 1 = the lab's own); default: chosen on the "
                                                      "images (lowest prediction entropy).")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="The classes the lab's crops can hold, comma-"
                                                   "separated (e.g. basophil,eosinophil,lymphocyte,monocyte,"
                                                   "neutrophil for white-cell crops): the adapted model answers among "
                                                   "them (predict --classes overrides) and --tune tunes for them. "
                                                   "Default: all the model's classes.")] = None,
    tune: Annotated[bool, typer.Option("--tune/--no-tune", help="Also tune the network on the crops without "
                                       "labels (SHOT: confident answers among --classes, in the lab's class mix). "
                                       "Changes the weights; on LISC's test half it raised macro-F1 from 0.78 (adapt "
                                       "alone) to 0.93-0.94 (docs/crosslab.md). For another lab's crops: on the "
                                       "training lab's own it costs accuracy.")] = False,
    tune_epochs: Annotated[int, typer.Option(min=1, max=50, help="Epochs of --tune over the crops.")] = 8,
    class_mix: Annotated[str, typer.Option("--class-mix", help=(
        "What --tune holds the crops' mean answer to: estimated = the lab's own class mix, estimated from the "
        "crops (a lab's differential: mostly neutrophils and lymphocytes); uniform = equal shares of --classes "
        "(SHOT as published: only for crops that hold every class about equally)."))] = "estimated",
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Export the adapted model to ONNX when the "
                                       "original had model.onnx.")] = True,
    framing: Annotated[str, typer.Option(
        "--framing", help="auto: look at the crops whole, as centre crops and padded into larger frames, and keep "
                          "the framing where they look most like the training data (a lab that crops tighter or "
                          "looser than the training lab); keep: the bundle's; or a share of the side (0.75 = the "
                          "centre 75 %, 2 = padded to twice the size).")] = "auto",
    overwrite: OverwriteOption = False,
) -> None:
    """Adapt BUNDLE to the lab that took IMAGES, a few hundred of its unlabelled crops.

    It chooses the framing of the lab's crops, re-estimates the network's normalisation (BatchNorm)
    statistics and refits the out-of-distribution reference and threshold on them. Weights,
    labels, colour canonicalisation, temperature and abstain rule stay as trained, unless --tune
    also tunes the network on the crops (without labels). The new bundle records what it was
    adapted on (name, count, content hash). Unreadable images are listed and skipped.
    """
    with user_errors():
        from hematoscope.bundle import load_bundle
        from hematoscope.bundle.adapt import CLASS_MIXES, adapt_bundle
        from hematoscope.predict.report import skipped_table
        from hematoscope.data.sources import ArchiveReader, ImageSource, expand_paths, left_out_summary

        if class_mix not in CLASS_MIXES:
            raise typer.BadParameter(f"one of {', '.join(CLASS_MIXES)}; got {class_mix!r}", param_hint="--class-mix")
        if framing not in ("auto", "keep"):
            try:
                framing_value: float | str | None = float(framing)
            except ValueError:
                raise typer.BadParameter(f"auto, keep or a number; got {framing!r}", param_hint="--framing") from None
        else:
            framing_value = None if framing == "keep" else "auto"
        check_out(out, overwrite)
        original = load_bundle(bundle_path)
        archives = ArchiveReader()
        left_out: list[str] = []

        def items():
            for item in expand_paths(paths, left_out=left_out):
                if isinstance(item, ImageSource) and item.member is not None:
                    yield item.name, archives.read(item)
                elif isinstance(item, ImageSource):
                    yield item.path
                else:
                    yield item

        label = source or Path(paths[0].rstrip("/")).name
        adapted, report = adapt_bundle(original, items(), source=label, name=name or bundle_name(out), target_tpr=target_tpr,
                                       mix=mix, classes=class_list(classes),
                                       tune_epochs=tune_epochs if tune else 0, framing=framing_value,
                                       class_mix=class_mix)
        from hematoscope.export.onnx import save_adapted

        saved = save_adapted(adapted, original, out, onnx=onnx)
    if report.skipped:
        err_console().print(skipped_table(report.skipped, limit=50))
    if left_out:
        err_console().print(left_out_summary(left_out), highlight=False)
    c = console()
    a = adapted.config.adaptation
    c.print(f"adapted [bold]{original.name}[/] → [bold]{adapted.name}[/] on {report.images} images of "
            f"{label!r} in {report.seconds:.0f} s ({len(report.skipped)} unreadable skipped)", highlight=False)
    if report.accepted_before is not None:
        c.print(f"share of these cells accepted as like the training data: {report.accepted_before:.1%} before, "
                f"{report.accepted_after:.1%} of held-out ones after", highlight=False)
    if report.framing:
        share = adapted.preprocess.framing
        c.print("framing: " + ("whole crops, as trained" if share == 1 else f"the centre {share:.0%} of each crop"
                               if share < 1 else f"each crop padded to {share:g}× its size")
                + (" (of the framings tried, the one where these cells look most like the training data)"
                   if "mean_ood_score" in report.framing else ""), highlight=False)
    if report.tuning:
        c.print(f"tuned {report.tuning['epochs']} epochs among {', '.join(a['classes'])} (loss by epoch: "
                f"{', '.join(f'{v:.3f}' for v in report.tuning['loss_by_epoch'])})", highlight=False)
        from hematoscope.bundle.card import shares_in_words

        mix = shares_in_words(report.class_mix) if report.class_mix else "equal shares (--class-mix uniform)"
        c.print(f"class mix tuned towards: {mix}", highlight=False)
    if a["classes"] != adapted.labels:
        c.print(f"it answers among {', '.join(a['classes'])} (predict --classes changes that)", highlight=False)
    c.print(f"answered with confidence: {a['answered_confidently']:.1%}; bundle: {saved}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
