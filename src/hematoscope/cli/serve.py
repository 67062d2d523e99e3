"""``hematoscope serve``: the web app and REST API."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import OodAcceptOption, err_console, user_errors


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
    max_upload_mb: Annotated[float, typer.Option(envvar="HEMATOSCOPE_MAX_UPLOAD_MB",
                                                 help="Largest accepted upload, in MB.")] = 64.0,
    max_request_megapixels: Annotated[Optional[float], typer.Option(
        help="Most decoded pixels in one request, all images together; 413 above it. [default: 500]")] = None,
    max_decoded_megapixels: Annotated[Optional[float], typer.Option(
        help="Most decoded pixels the server holds at once over all requests (bounds memory: ~3-7 bytes per "
             "pixel). [default: 200]")] = None,
    workers: Annotated[int, typer.Option(envvar="HEMATOSCOPE_WORKERS", help="Threads that decode images and make "
                                         "thumbnails and explanations at once.")] = 2,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Most images per model call; concurrent requests share calls. [default: 64]")] = None,
    batch_wait_ms: Annotated[Optional[float], typer.Option(
        "--batch-wait-ms", help="How long a model call waits for other requests to join it. [default: 5]")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option(
        "--max-concurrent",
        help="Analyses in progress at once; as many more may wait, then 503. [default: 64]")] = None,
    max_queued_images: Annotated[Optional[int], typer.Option(
        "--max-queued-images", help="Most images waiting for the model; beyond it 503 with Retry-After. "
                                    "[default: 1024]")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="Host name clients use to reach the server, besides localhost and the --host "
                               "address; repeat for several ('*.lab.example' for subdomains, '*' for any).")] = None,
    allowed_origin: Annotated[Optional[list[str]], typer.Option(
        "--allowed-origin", help="Another site (https://host[:port]) whose pages may send uploads and "
                                 "corrections; the server's own pages always may.")] = None,
    retention_days: Annotated[Optional[float], typer.Option(
        "--retention-days", help="Delete analyses older than this many days. [default: keep until deleted]")] = None,
    classes: Annotated[Optional[str], typer.Option(
        "--classes", help="Answer only among these classes, comma-separated, with every served model (e.g. "
                          "basophil,eosinophil,lymphocyte,monocyte,neutrophil for white-cell crops). "
                          "[default: all of each model's classes]")] = None,
    recolour: Annotated[bool, typer.Option(
        "--recolour", help="Models with a framing search (the shipped one) also try its colour changes on cells "
                           "still flagged, as predict --recolour: for another lab's stain.")] = False,
    ood_accept: OodAcceptOption = None,
    adapt_dir: Annotated[Optional[Path], typer.Option(
        "--adapt-dir", help="Let the web app adapt a model to a lab's unlabelled crops (its Adapt tab, POST "
                            "/api/models/adapt), saving each adapted model in this folder; those already there are "
                            "served too. [default: off]")] = None,
) -> None:
    """Serve the web page (at /) and the REST API (docs at /docs) for classifying cell images.

    For a lab network see docs/security.md: --host 0.0.0.0 --allowed-host NAME --token, behind a
    TLS reverse proxy.
    """
    with user_errors():
        import uvicorn

        from hematoscope.serve.app import create_app
        from hematoscope.serve.config import LOCAL_HOSTS, WILDCARD_ADDRESSES, Settings

        # Options left out fall back to HEMATOSCOPE_* environment variables, then to the defaults.
        optional = {"max_request_megapixels": max_request_megapixels, "max_decoded_megapixels": max_decoded_megapixels,
                    "allowed_hosts": allowed_host, "allowed_origins": allowed_origin, "retention_days": retention_days,
                    "batch_size": batch_size, "batch_wait_ms": batch_wait_ms, "max_concurrent": max_concurrent,
                    "max_queued_images": max_queued_images, "classes": classes, "recolour": recolour or None,
                    "ood_accept": ood_accept, "adapt_dir": adapt_dir}
        settings = Settings(models=model or [], host=host, port=port, token=token, db=db, max_upload_mb=max_upload_mb,
                            workers=workers, **{k: v for k, v in optional.items() if v is not None})
        app = create_app(settings)
    if host not in ("127.0.0.1", "localhost", "::1") and settings.token_value() is None:
        err_console().print("[yellow]warning:[/] listening beyond this machine without --token: anyone who can "
                            "reach it can use the API and read the history")
    if host in WILDCARD_ADDRESSES and set(settings.trusted_hosts()) <= set(LOCAL_HOSTS):
        err_console().print("[yellow]warning:[/] listening on every interface, but only local host names are "
                            "accepted: add --allowed-host NAME for the name (or address) other machines use")
    names = ", ".join(app.state.models)
    err_console().print(f"hematoscope: serving {names} at http://{host}:{port}/  (API docs: /docs, "
                        f"history: {settings.db_path()})", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
