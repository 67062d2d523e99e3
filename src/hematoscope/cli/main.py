"""Entry point of the ``hematoscope`` command.

Each command group lives in its own module with a ``register(app)`` function. Modules import
only typer/rich at load time; heavy libraries are imported inside the commands, so
``hematoscope --help`` stays fast.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Annotated, Optional

import typer

from hematoscope import __version__
from hematoscope.cli._common import Terminated, err_console

#: Command modules, in help order. Each defines ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = ["demo", "data", "train", "adapt", "evaluate", "predict", "features", "fewshot", "classical",
                   "trust", "export", "serve"]

def _flags_take_no_value() -> None:
    """typer 0.29 writes a value type after every flag in --help (``--outliers <bool>``, even
    ``--help <bool>``), which reads as an option that takes true/false; a flag shows none."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if (self.is_flag or self.count) and self.metavar is None else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()

app = typer.Typer(
    name="hematoscope",
    help="Classify microscope images of single blood cells.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hematoscope {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    """hematoscope: from a folder of cell images to a trusted prediction."""


def reflowed(doc: str) -> str:
    """A docstring as help text: each paragraph on one line, list paragraphs ("- ...") line by
    line. Typer's rich help keeps a docstring's single line breaks, so wrapped source lines
    printed ragged, cut mid-sentence."""
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = [line.strip() for line in para.splitlines()]
        listed = any(line.startswith(("- ", "* ")) for line in lines)
        out.append("\n".join(lines) if listed or para.startswith("\b") else " ".join(lines))
    return "\n\n".join(out)


def _said_on_interrupt(callback, name: str):
    """``callback``, saying what an interruption (Ctrl-C, or SIGTERM once :func:`run` set it to
    interrupt) left before exiting with 130 / 143: typer exits silently, which reads like a crash or
    like success. A command that says more itself (``train``: how to resume) catches it first."""
    import functools

    @functools.wraps(callback)
    def wrapped(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as exc:
            _said_stopped(name, exc)
        except typer.Exit:
            raise  # a command's own ending (train's, after an interruption it handled)
        except Exception as exc:
            # an interruption that landed inside a library's clean-up (Ray's threads: "release
            # unlocked lock") surfaces as that error, chained to the interruption
            cause = _interruption_in(exc)
            if cause is None:
                raise
            _said_stopped(name, cause)

    return wrapped


def _interruption_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The interruption ``exc`` was raised while handling, if any (not one a handler turned into
    ``exc`` on purpose, ``raise ... from None``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        if exc.__suppress_context__:
            return None
        seen.add(id(exc))
        exc = exc.__context__
    return None


def _said_stopped(name: str, exc: KeyboardInterrupt):
    import signal

    terminated = isinstance(exc, Terminated)
    how = "stopped (SIGTERM)" if terminated else "interrupted"
    err_console().print(f"hematoscope {name}: {how}; its output files are written whole or not at all, "
                        "so none was left half-written: run it again", highlight=False)
    raise typer.Exit(128 + int(signal.SIGTERM) if terminated else 130) from None


def _prepare_commands(typer_app: typer.Typer, prefix: str = "") -> None:
    """Reflowed help and a word on interruption for every command of ``typer_app``."""
    for info in typer_app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = reflowed(doc)
        if info.callback:
            name = info.name or info.callback.__name__.replace("_", "-")
            info.callback = _said_on_interrupt(info.callback, f"{prefix}{name}")
    for group in typer_app.registered_groups:
        _prepare_commands(group.typer_instance, f"{prefix}{group.name or group.typer_instance.info.name} ")


for _name in COMMAND_MODULES:
    importlib.import_module(f"hematoscope.cli.{_name}").register(app)
_prepare_commands(app)


def _terminate(signum, frame) -> None:
    raise Terminated


def _show_warnings_plainly() -> None:
    """hematoscope's own warnings (a calibration that could not be fitted, a class missing from
    a split ...) as one "warning: ..." line each, not Python's "path:line: UserWarning: ..." form."""
    import warnings
    from pathlib import Path

    shown = warnings.showwarning
    package = str(Path(__file__).resolve().parents[1])

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and str(Path(filename).resolve()).startswith(package):
            err_console().print(f"warning: {message}", highlight=False, markup=False)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def run() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    _show_warnings_plainly()
    app()
