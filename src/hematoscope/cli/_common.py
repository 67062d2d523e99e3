"""Helpers shared by the command modules: consistent errors and output."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
    """Turn the library's typed errors (ValueError family, FileNotFoundError) into a clean
    one-line message and exit code 2 instead of a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise fail(str(exc)) from None
