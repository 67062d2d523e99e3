"""``hematoscope demo``: the offline first run — classify the bundled real PBC cells with the
shipped default model and show what a lab user gets (per-cell table, differential count)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import console, user_errors


def demo(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Bundle to use instead of the shipped "
                                                  "default model.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the per-cell results here "
                                                "(.csv or .json).")] = None,
) -> None:
    """Classify the bundled real PBC sample cells offline and compare with their known classes."""
    with user_errors():
        from rich.table import Table

        from hematoscope.bundle import load_bundle
        from hematoscope.bundle.default import default_bundle_path
        from hematoscope.predict.pipeline import predict_paths
        from hematoscope.predict.report import differential_table, write_csv, write_json
        from hematoscope.samples import sample_paths, samples_dir
        from hematoscope.taxonomy import TAXONOMY

        bundle = load_bundle(model if model is not None else default_bundle_path())
        paths = sample_paths()
        pred = predict_paths(bundle, paths)
        if out is not None:
            (write_json if out.suffix.lower() == ".json" else write_csv)(pred, out)

    c = console()
    c.print(f"[bold]{bundle.name}[/] ({bundle.kind}, {len(bundle.labels)} classes) on {len(paths)} bundled "
            f"PBC sample cells from {samples_dir()}", highlight=False)
    table = Table("cell", "known class", "predicted", "confidence", "flag")
    answered = right = aside_right = 0
    for src, guess, conf, ab, why in zip(pred.sources, pred.predicted, pred.confidence, pred.abstain,
                                         pred.abstain_reason):
        truth = TAXONOMY.canonical("pbc", Path(src).parent.name)
        ok = truth == guess
        answered += not ab
        right += ok and not ab
        aside_right += ok and ab
        table.add_row(Path(src).name, TAXONOMY.display(truth or "?"),
                      f"[{'green' if ok else 'red'}]{TAXONOMY.display(guess)}[/]", f"{conf:.3f}",
                      f"abstain: {why}" if ab else "")
    c.print(table)
    c.print(differential_table(pred.differential(), title="Differential count"))
    aside = len(pred) - answered
    c.print(f"{right}/{answered} answered sample cells right"
            + (f"; {aside} set aside as uncertain or unusual (the best guess right for {aside_right})" if aside else "")
            + (f"; results written to {out}" if out else ""), highlight=False)
    cmd = _command_name()
    c.print(f"Next: [bold]{cmd} predict YOUR_FOLDER --out preds.csv[/] or [bold]{cmd} serve[/] for the web app.")


def _command_name() -> str:
    """How to call hematoscope again: its name when it is on PATH, else the path it was run by
    (e.g. .venv/bin/hematoscope after setup, before the venv is activated)."""
    import os
    import shutil
    import sys

    here = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    on_path = shutil.which("hematoscope")
    if not here.endswith("hematoscope") or (on_path is not None and os.path.realpath(on_path) == here):
        return "hematoscope"  # on PATH, or not run as the console script (python -m, tests)
    return sys.argv[0]


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
