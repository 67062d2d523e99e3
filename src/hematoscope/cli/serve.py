"""``hematoscope serve``: the web app and REST API."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import err_console, user_errors


def serve(
    model: Annotated[Optional[list[Path]], typer.Option(
        "--model", "-m", help="Bundle directory or .zip to serve; repeat to serve several (the first is the "
                              "default). Default: the model shipped with hematoscope.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        envvar="HEMATOSCOPE_TOKEN", show_envvar=True,
        help="Require 'Authorization: Bearer TOKEN' on the API (health excepted).")] = None,
    db: Annotated[Optional[Path], typer.Option(
        help="SQLite history file. Default: history.sqlite3 in the user data directory.")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB.")] = 64.0,
    workers: Annotated[int, typer.Option(help="Inference worker threads.")] = 2,
) -> None:
    """Serve the web page (at /) and the REST API (docs at /docs) for classifying cell images."""
    with user_errors():
        import uvicorn

        from hematoscope.serve.app import create_app
        from hematoscope.serve.config import Settings

        settings = Settings(models=model or [], host=host, port=port, token=token, db=db,
                            max_upload_mb=max_upload_mb, workers=workers)
        app = create_app(settings)
    if host not in ("127.0.0.1", "localhost", "::1") and settings.token_value() is None:
        err_console().print("[yellow]warning:[/] listening beyond this machine without --token: anyone who can "
                            "reach it can use the API and read the history")
    names = ", ".join(app.state.models)
    err_console().print(f"hematoscope: serving {names} at http://{host}:{port}/  (API docs: /docs, "
                        f"history: {settings.db_path()})", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
