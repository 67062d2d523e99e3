"""Entry point of the ``hematoscope`` command.

Each command group lives in its own module with a ``register(app)`` function. Modules import
only typer/rich at load time; heavy libraries are imported inside the commands, so
``hematoscope --help`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

from hematoscope import __version__

#: Command modules, in help order. Each defines ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = ["demo", "data", "train", "adapt", "evaluate", "predict", "features", "fewshot", "classical",
                   "trust", "export", "serve"]

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


for _name in COMMAND_MODULES:
    importlib.import_module(f"hematoscope.cli.{_name}").register(app)


def run() -> None:
    app()
