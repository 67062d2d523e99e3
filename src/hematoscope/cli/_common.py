"""Helpers shared by the command modules: consistent errors and output."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Iterator, Optional

import typer


def console():
    from rich.console import Console

    return Console()


def err_console():
    from rich.console import Console

    return Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``message`` as an error on stderr and return an Exit to raise."""
    err_console().print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's typed errors (ValueError family; OSError such as a missing file, a folder
    where a file should be or a full disk; a missing optional extra) into a clean one-line message
    and exit code 2 instead of a traceback."""
    from hematoscope._extras import MissingExtraError

    try:
        yield
    except (ValueError, OSError) as exc:  # OSError: the user's paths, disk and permissions
        raise fail(_message(exc)) from None
    except MissingExtraError as exc:  # "pip install 'hematoscope[train]'": brackets are not markup here
        from rich.markup import escape

        raise fail(escape(str(exc))) from None


def _message(exc: BaseException) -> str:
    """``exc`` in one line per problem; a settings model's validation error as "option: what is
    wrong" without pydantic's documentation links."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in errors())
    return str(exc)


#: ``--tta`` for commands that run a bundle on images.
TtaOption = Annotated[Optional[int], typer.Option(
    "--tta", help="Flip/rot90 views averaged per image: 1, 2, 4 or 8 (default: the bundle's own setting, the "
                  "adaptive cascade when fitted: 1 view, more for uncertain or unfamiliar cells; 2 in the shipped model). "
                  "More views are proportionally slower and flag unknown cell types better.")]


#: ``--reframe/--no-reframe`` for commands that run a bundle on images.
ReframeOption = Annotated[Optional[bool], typer.Option(
    "--reframe/--no-reframe", show_default=False,
    help="Framing search: cells flagged as unlike the training data are tried again on centre crops and, when "
         "their crop looks framed tight, padded to the size the model knows (default: the bundle's own setting; "
         "the shipped model has it on). --no-reframe answers every "
         "cell from its whole crop.")]

#: ``--classes`` for commands that run a bundle on images.
ClassesOption = Annotated[Optional[str], typer.Option(
    "--classes", help="Answer only among these classes, comma-separated (e.g. a 5-part white-cell differential: "
                      "basophil,eosinophil,lymphocyte,monocyte,neutrophil); default: all the model's classes.")]

#: ``--recolour`` for commands that run a bundle on images.
RecolourOption = Annotated[bool, typer.Option(
    "--recolour", help="Framing search with colours: cells still flagged after the framings are also tried with "
                       "stronger saturation and a darker gamma, at every framing, and answered from the look most "
                       "like the training data (column recolour). For another lab's stain: on LISC it answered more "
                       "cells (abstained 33 -> 25 %) and raised macro-F1 (0.81 -> 0.86); slower where many cells are "
                       "flagged, and damaged cells are flagged less often (docs/crosslab.md).")]


#: ``--ood-accept`` for commands that run a bundle on images.
OodAcceptOption = Annotated[Optional[float], typer.Option(
    "--ood-accept", show_default=False,
    help="Operating point of the unlike-training flag: the share of the model's own validation cells it accepts, "
         "0.8, 0.9, 0.95, 0.975 or 0.99 (default: as fitted, about 0.95). Higher sets aside fewer of another lab's "
         "cells, answers more of them wrongly and flags fewer damaged cells; on LISC 0.99 set aside 20 % instead "
         "of 33 %, 88 % right on the answered instead of 95 % (docs/trust.md).")]


def apply_tta(bundle, views: int | None) -> None:
    """Use ``views`` test-time views when given (a ValueError for kinds without them)."""
    if views is not None:
        bundle.set_tta(views)


def class_list(text: str | None) -> list[str] | None:
    """A ``--classes`` value (comma-separated, spaces allowed) as class names; None when not given."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace the bundle that --out already holds.")]


def check_out(out, overwrite: bool) -> None:
    """Refuse to write a new bundle over one that ``out`` already holds (a lab's adapted or
    few-shot model is easily named alike) unless ``overwrite``."""
    from hematoscope.bundle.base import is_bundle_path

    if is_bundle_path(out) and not overwrite:
        raise typer.BadParameter(f"{out} already holds a model bundle; choose another --out, or pass --overwrite "
                                 "to replace it", param_hint="--out")


def bundle_name(out) -> str:
    """A new bundle's default name: its --out folder's (or zip's) name, as the lab chose it."""
    from pathlib import Path

    return Path(out).stem if Path(out).suffix.lower() == ".zip" else Path(out).name


def warn_unknown_labels(table, what: str) -> None:
    """Say which labels of ``table`` the taxonomy does not know: each becomes a class of the model
    (``what`` says so), so a typo ('basophill') would be answered as a class of its own."""
    from rich.markup import escape

    from hematoscope.data.samples import class_column, has_label
    from hematoscope.taxonomy import unknown_labels_note

    labelled = table[has_label(table)]
    if not len(labelled):
        return
    classes = class_column(labelled)
    unknown = labelled["canonical"].isna().to_numpy()
    counts = {c: int((classes[unknown] == c).sum()) for c in set(classes[unknown])}
    note = unknown_labels_note({c: f"{n} image{'s' if n != 1 else ''}" for c, n in counts.items()},
                               set(classes[~unknown]), what=what)
    if note:
        err_console().print(f"[yellow]warning:[/] {escape(note)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's cancel or time limit), raised in the main thread like
    Ctrl-C so that the same clean-up runs: a partial output file is removed, not left behind
    (``hematoscope.cli.main.run`` raises it for every command; ``train`` outside Lightning's loop)."""
