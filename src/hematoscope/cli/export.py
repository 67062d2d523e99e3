"""``hematoscope export``: write an ONNX copy of a model for fast CPU inference."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import OverwriteOption, check_out, console, fail, user_errors

FORMATS = ("onnx",)


def export(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Model bundle (directory or .zip).",
                                                show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="Export format.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write a copy of the bundle with the "
                                                "exported model here (default: into BUNDLE itself).")] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8: static quantisation, "
                                                    "refused when it changes too many predictions.")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation data (folder or split file) to "
                                                "measure the int8 accuracy change on.")] = None,
    min_agreement: Annotated[float, typer.Option("--min-agreement", min=0.0, max=1.0,
                                                 help="Smallest int8/float32 top-1 agreement accepted.")] = 0.98,
    opset: Annotated[int, typer.Option("--opset", min=17, help="ONNX opset.")] = 17,
    overwrite: OverwriteOption = False,
) -> None:
    """Export a neural bundle to ONNX (model.onnx), checked against PyTorch before it is written.

    Afterwards `hematoscope predict` and `hematoscope serve` use ONNX Runtime for this bundle.
    """
    if fmt not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if out is not None:
        check_out(out, overwrite)
    with user_errors():
        from hematoscope.bundle import load_bundle
        from hematoscope.export.onnx import export_onnx

        bundle = load_bundle(bundle_path)
        report = export_onnx(bundle, out, quantize=quantize, opset=opset, validation=val,
                             min_agreement=min_agreement)

    from rich.table import Table

    table = Table(title="ONNX export", title_justify="left", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("written", report.onnx_path)
    table.add_row("precision / opset", f"{report.precision} / {report.opset}")
    table.add_row("size", f"{report.size_bytes / 1e6:.1f} MB")
    table.add_row("max |Δ prob| vs PyTorch" + (", float32" if report.int8_max_prob_diff is not None else ""),
                  f"{report.max_prob_diff:.1e} on {report.parity_source}")
    if report.int8_max_prob_diff is not None:  # the model written: what its users get
        table.add_row("max |Δ prob| vs PyTorch, int8", f"{report.int8_max_prob_diff:.1e} on {report.parity_source}")
    if report.top1_agreement is not None:
        table.add_row("int8 top-1 agreement", f"{report.top1_agreement:.2%} on {report.agreement_source}")
    if report.accuracy:
        acc = report.accuracy
        table.add_row("accuracy float32 → int8", f"{acc['float32']:.2%} → {acc['int8']:.2%} (n={acc['n']})")
    table.add_row("time", f"{report.seconds:.1f} s")
    console().print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
