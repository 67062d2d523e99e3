"""``hematoscope predict``: classify files, folders, globs and zip files."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import (ClassesOption, OodAcceptOption, RecolourOption, ReframeOption, TtaOption,
                                     class_list, console, err_console, fail, user_errors)

BACKENDS = ("auto", "torch", "onnx")
#: A run where at least this share of at least this many cells look unlike the training data
#: ends with a pointer to --framing auto and adapt (another lab's crops, most likely).
LAB_HINT_SHARE, LAB_HINT_MIN = 0.2, 20
#: Per-image rows printed when no --out file is given.
SHOWN_ROWS = 30


def predict(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", show_default=False,
                                               help="Image files, folders (recursive), glob patterns or zip files.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model bundle (directory or .zip); "
                                                  "default (or 'default'): the shipped PBC model.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write per-image results to a .csv or .json "
                                                "file (CSV also writes <name>.differential.csv).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes listed per image.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")] = 64,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Decoding threads "
                                                   "(default: one per CPU).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="Inference backend: auto (ONNX Runtime when "
                                                   "the bundle has model.onnx), torch or onnx (default: "
                                                   "$HEMATOSCOPE_BACKEND, else auto).", show_default=False)] = None,
    abstain_below: Annotated[Optional[float], typer.Option("--abstain-below", min=0.0, max=1.0,
                                                           help="Abstain when the calibrated top probability is "
                                                           "below this, for every view count (default: the bundle's own "
                                                           "threshold); the OOD flag and the cascade stay as fitted.")] = None,
    tta: TtaOption = None,
    reframe: ReframeOption = None,
    recolour: RecolourOption = False,
    ood_accept: OodAcceptOption = None,
    framing: Annotated[Optional[str], typer.Option(
        "--framing", help="The share of each crop's side the model sees: a number (0.75 = the centre 75 %, 2 = the "
                          "crop padded to twice its size, for crops cut close around the cell), or auto: the one "
                          "under which up to 300 of this run's images look most like the training data (every "
                          "answer then depends on the run's images). Default: the bundle's.")] = None,
    classes: ClassesOption = None,
    engine: Annotated[str, typer.Option("--engine", help="local (this process) or ray (Ray Data: a local "
                                        "instance, or the cluster at --address; see docs/scale.md).")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster to join (--engine ray), "
                                                   "e.g. 10.0.0.5:6379; default: start a local instance.")] = None,
    shard_dir: Annotated[Optional[Path], typer.Option("--shard-dir", help="--engine ray: job folder for the "
                                                      "Parquet result shards (default: next to --out, "
                                                      "<name>.shards); run again to resume.")] = None,
    actors: Annotated[Optional[int], typer.Option("--actors", min=1, help="--engine ray: model actors "
                                                  "(default: one per CPU of the cluster).")] = None,
    shard_rows: Annotated[Optional[int], typer.Option("--shard-rows", min=1, help="--engine ray: images per "
                                                      "result shard, the work a stopped job can lose (default "
                                                      "10,000; fixed when the job starts).",
                                                      show_default=False)] = None,
) -> None:
    """Classify cell images and print the differential count.

    Unreadable files are listed with their reason and the run goes on. Exit code 0 when at least one image was classified, 1 when none was.
    """  # noqa: E501 (one line: rich help keeps the docstring's line breaks)
    named = backend is not None or os.environ.get("HEMATOSCOPE_BACKEND") is None
    backend = backend or os.environ.get("HEMATOSCOPE_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise fail(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}"
                   + ("" if named else " (from HEMATOSCOPE_BACKEND)"))
    if engine not in ("local", "ray"):
        raise fail(f"--engine must be local or ray; got {engine!r}")
    framing_value = _framing(framing)
    with user_errors():
        from hematoscope.predict.options import InferenceOptions

        options = InferenceOptions(backend=backend, tta=tta, abstain_below=abstain_below, classes=class_list(classes),
                                   reframe=reframe, recolour=recolour, ood_accept=ood_accept,
                                   framing=None if framing_value == "auto" else framing_value)
    if engine == "ray":
        if framing_value == "auto":
            with user_errors():
                from hematoscope.data.sources import expand_paths
                from hematoscope.predict.pipeline import choose_run_framing, load_for_inference

                probe = load_for_inference(model, options)  # as the local engine chooses it
                framing_value = choose_run_framing(probe, expand_paths(paths))["framing"]
            err_console().print(f"framing: {framing_value:g} of each crop's side (chosen on this run's images)")
            options = options.replace(framing=framing_value)
        return _predict_ray(paths, model=model, out=out, top_k=top_k, batch_size=batch_size, workers=workers,
                            address=address, shard_dir=shard_dir, actors=actors, options=options,
                            shard_rows=shard_rows)
    if address or shard_dir or actors or shard_rows:
        raise fail("--address, --shard-dir, --actors and --shard-rows go with --engine ray")
    from hematoscope.predict.distributed import is_manifest

    manifests = [p for p in paths if is_manifest(p) and Path(p).is_file()]
    if manifests:
        raise fail(f"{manifests[0]} is a list of images (a manifest): the Ray engine reads those "
                   "(--engine ray --out FILE); locally, name the images, their folders or a glob")
    with user_errors():
        import numpy as np

        from hematoscope.predict.pipeline import load_for_inference, predict_sources
        from hematoscope.predict.report import (ReportWriter, differential_table, empty_differential,
                                                merge_differentials, predictions_table, skipped_table)
        from hematoscope.data.sources import ImageSource, expand_paths
        from hematoscope.progress import track

        bundle = load_for_inference(model, options)
        if backend == "onnx" and "onnx" not in bundle.backends:
            raise fail(f"--backend onnx needs a neural bundle; {bundle.name!r} is {bundle.kind!r}")
        left_out: list[str] = []
        items = expand_paths(paths, left_out=left_out)
        n_images = sum(isinstance(i, ImageSource) for i in items)
        if not n_images:  # a mistyped folder: said in a line, with no empty tables or result files
            from rich.markup import escape

            from hematoscope.data.sources import left_out_summary

            reasons = "; ".join(str(i) for i in items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")
            err_console().print(f"[red]error:[/] nothing to classify: {escape(reasons)}"
                                + (f"\n{escape(left_out_summary(left_out))}" if left_out else ""))
            raise typer.Exit(1)
        chosen = None
        if framing_value == "auto":
            from hematoscope.predict.pipeline import choose_run_framing

            t0 = time.perf_counter()
            chosen = choose_run_framing(bundle, items)
            chosen["seconds"] = time.perf_counter() - t0
        writer = ReportWriter(out, bundle.labels, top_k=top_k, model=bundle.describe()) if out else None
        diff, skipped, shown = empty_differential(bundle.labels), [], []
        views_used: dict[int, int] = {}
        reframed = recoloured = 0
        start = time.perf_counter()
        try:
            batches = predict_sources(bundle, items, batch_size=batch_size, workers=workers)
            for pred in track(batches, total=math.ceil(len(items) / batch_size),
                              description=f"classifying {n_images} image{'s' * (n_images != 1)}"):
                diff = merge_differentials(diff, pred.differential())
                skipped.extend(pred.skipped)
                if pred.views is not None:
                    for v, n in zip(*np.unique(pred.views, return_counts=True)):
                        views_used[int(v)] = views_used.get(int(v), 0) + int(n)
                answered = ~np.asarray(pred.abstain, bool)  # the lines below say "answered from"
                if pred.framing is not None:
                    reframed += int(np.sum((pred.framing != 1) & answered))
                if pred.recolour is not None:
                    recoloured += int(np.sum((pred.recolour != "") & answered))
                if writer:
                    writer.add(pred)
                elif sum(map(len, shown)) < SHOWN_ROWS:
                    shown.append(pred)
        except BaseException:
            if writer:
                writer.abort()
            raise
        seconds = time.perf_counter() - start
        if writer:
            writer.close()

    out_console = console()
    if shown:
        from hematoscope.bundle.prediction import Prediction

        out_console.print(predictions_table(Prediction.concat(shown), top_k=top_k, limit=SHOWN_ROWS))
        if diff.classified + diff.abstained > SHOWN_ROWS:
            out_console.print(f"... {diff.classified + diff.abstained - SHOWN_ROWS} more (use --out FILE for all)")
    out_console.print(differential_table(diff, title=f"Differential count ({bundle.name})",
                                         classes=bundle.answerable_classes))
    if skipped:
        err_console().print(skipped_table(skipped, limit=50))
        if len(skipped) > 50:
            err_console().print(f"... and {len(skipped) - 50} more unreadable files"
                                + (f" (all listed in {out})" if out else ""))
    if left_out:
        from hematoscope.data.sources import left_out_summary

        err_console().print(left_out_summary(left_out), highlight=False)
    done = diff.classified + diff.abstained
    if bundle.uses_cascade and done:
        rule = bundle.config.cascade
        slow = sum(n for v, n in views_used.items() if v == rule.slow_views)
        out_console.print(f"views: cascade, {slow / done:.1%} of cells took the slow path ({rule.slow_views} views; "
                          f"the others {rule.fast_views})", highlight=False)
    elif views_used:
        out_console.print(f"views: {bundle.views_per_image} per cell", highlight=False)
    if chosen is not None:
        share = chosen["framing"]
        out_console.print(f"framing: {share:g} of each crop's side (" + ("whole crops" if share == 1 else
                          "centre crops" if share < 1 else "crops padded into larger frames")
                          + f"; chosen on {chosen['images']} of this run's images in {chosen['seconds']:.1f} s, "
                          "before classifying)", highlight=False)
    if bundle.reframes and done:
        framed = "whole" if bundle.preprocess.framing == 1 else f"at the run's framing ({bundle.preprocess.framing:g})"
        out_console.print(f"framing search: {reframed / done:.1%} of cells looked unlike the training data {framed} "
                          "and were answered from another framing (column framing, relative to the run's; "
                          "--no-reframe to turn off)", highlight=False)
        if bundle.config.reframe.colours:
            out_console.print(f"colour search: {recoloured / done:.1%} of cells were answered with changed colours "
                              "(column recolour)", highlight=False)
    if bundle.config.ood_accept is not None:
        cells = ("the model's validation cells" if bundle.config.adaptation is None else
                 f"the held-out crops of {bundle.config.adaptation['source']!r} it was adapted on")
        out_console.print(f"unlike-training flag: moved to accept {bundle.config.ood_accept:.1%} of "
                          + cells + (" (--ood-accept)" if ood_accept is not None else " (saved with the "
                                                "bundle)"), highlight=False)
    if bundle.answerable_classes != bundle.labels:
        why = "" if classes else " (the classes the model was adapted to; --classes to change)"
        out_console.print(f"answers restricted to: {', '.join(bundle.answerable_classes)}{why}", highlight=False)
    unlike = _unlike_share(diff, done)
    if unlike >= LAB_HINT_SHARE and done >= LAB_HINT_MIN:
        err_console().print(_lab_hint(bundle, model, unlike, framing_chosen=chosen is not None), highlight=False)
    rate = f", {done / seconds:.0f} images/s" if seconds > 0 and done else ""
    out_console.print(f"{_answered(diff)} in {seconds:.1f} s{rate}" + (f"; results in {out}" if out else ""),
                      highlight=False)
    if done == 0:
        raise typer.Exit(1)


def _answered(diff) -> str:
    """The closing count in the differential table's words: answered and set aside add up."""
    n = diff.classified + diff.abstained
    return f"{n} image{'s' * (n != 1)} through the model ({diff.classified} classified, {diff.abstained} abstained)"


def _framing(text: str | None) -> float | str | None:
    """A ``--framing`` value: None, "auto" or a share of the side."""
    if text is None or text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"auto or a number; got {text!r}", param_hint="--framing") from None
    if not 0.3 <= value <= 3:
        raise typer.BadParameter(f"a share of the side in [0.3, 3]; got {value:g}", param_hint="--framing")
    return value


def _predict_ray(paths: list[str], *, model, out, top_k, batch_size, workers, address, shard_dir, actors,
                 options, shard_rows: int | None = None) -> None:
    """``--engine ray``: the job of :func:`hematoscope.predict.distributed.run_job`, then the
    same report as the local engine."""
    if shard_dir is None:
        if out is None:
            raise fail("--engine ray writes Parquet shards: give --out FILE (shards next to it) or --shard-dir DIR")
        shard_dir = out.with_name(out.stem + ".shards")
    with user_errors():
        from hematoscope.predict.distributed import require_distributed

        require_distributed()
        from hematoscope.predict.distributed import run_job
        from hematoscope.predict.report import differential_table, skipped_table

        c = console()

        run_rows = []  # files read in this run, not taken from shards written before

        def shard_done(shard: int, rows: int) -> None:
            run_rows.append(rows)
            c.print(f"shard {shard} written ({rows} rows)", highlight=False)

        result = run_job(paths, shard_dir, model=model, address=address, batch_size=batch_size, actors=actors,
                         decode_threads=workers, options=options, report=out, top_k=top_k, on_shard=shard_done,
                         **({"shard_rows": shard_rows} if shard_rows else {}))
    c.print(differential_table(result.differential, title=f"Differential count ({result.model})",
                               classes=list(options.classes) if options.classes else None))
    if result.skipped:
        err_console().print(skipped_table(result.skipped, limit=50))
        if result.differential.skipped > 50:
            err_console().print(f"... and {result.differential.skipped - 50} more unreadable files"
                                + (f" (all listed in {out})" if out else ""))
    if result.left_out:
        err_console().print(result.left_out, highlight=False)
    done, ran = result.classified, sum(run_rows)
    rate = f", {ran / result.seconds:.0f} files/s" if result.seconds > 0 and ran else ""
    c.print(f"{_answered(result.differential)} in {result.seconds:.1f} s{rate} on Ray ({result.shards_written} "
            f"shards written, {result.shards_skipped} already there: {ran} files read in this run); "
            f"shards in {shard_dir}" + (f"; results in {out}" if out else ""), highlight=False)
    if done == 0:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


def _unlike_share(diff, done: int) -> float:
    from hematoscope.bundle.prediction import UNLIKE_TRAINING

    return diff.abstain_reasons.get(UNLIKE_TRAINING, 0) / done if done else 0.0


def _lab_hint(bundle, model: str | None, unlike: float, *, framing_chosen: bool) -> str:
    """The note that ends a run where many cells look unlike the training data: what a lab can
    try next, leaving out what this run already did."""
    adaptation = bundle.config.adaptation
    if adaptation is not None:
        return (f"note: {unlike:.0%} of the cells look unlike the crops of {adaptation['source']!r} that "
                f"{bundle.name!r} was adapted on, and were not answered. If they come from another lab or setting, "
                f"adapt the original model ({adaptation['adapted_from']}) to a few hundred of them, or label a few "
                "per class (hematoscope fewshot fit; docs/crosslab.md).")
    if not bundle.adaptable:
        return (f"note: {unlike:.0%} of the cells look unlike the training data and were not answered. A "
                f"{bundle.kind} bundle cannot be adapted to another lab: if they are one lab's crops, use the default "
                "model (hematoscope adapt default FOLDER --out my-lab) or label a few per class (hematoscope fewshot "
                "fit; docs/crosslab.md).")
    tries = [option for option, useful in (
        ("--framing auto", not framing_chosen),
        ("--recolour", bundle.config.reframe is not None and not bundle.config.reframe.colours)) if useful]
    return (f"note: {unlike:.0%} of the cells look unlike the training data and were not answered. If they are "
            "one lab's crops (its own microscope, stain or framing), "
            + (f"try {' or '.join(tries)}, or " if tries else "")
            + f"adapt the model to a few hundred of them: hematoscope adapt {model or 'default'} FOLDER --out my-lab "
            "(docs/crosslab.md)."
            + (" --ood-accept 0.99 sets fewer aside, but more of those it then answers are wrong (docs/trust.md)."
               if bundle.config.ood_accept is None and 0.99 in bundle.ood_accept_shares() else ""))
