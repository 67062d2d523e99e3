"""The web app: REST API under /api, the single-page UI at /, OpenAPI docs at /docs."""
from __future__ import annotations

import math
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import APIRouter, FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hematoscope.serve.analysis import PixelBudget
from hematoscope.serve.config import Settings, normalise_origin
from hematoscope.serve.batching import start_batcher
from hematoscope.serve.deps import adapted_model_dirs, load_models
from hematoscope.serve.routes import analyses, health, models, predict
from hematoscope.serve.storage import HistoryStore

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app: load the bundles once and open the history database.

    Args:
        settings: configuration; None reads it from ``HEMATOSCOPE_*`` environment variables.

    Raises:
        ServeError: no model to serve, or a bundle that does not load.
        StorageError: the history database cannot be used.
    """
    from hematoscope import __version__

    from starlette.middleware.trustedhost import TrustedHostMiddleware

    settings = settings if settings is not None else Settings()
    if settings.adapt_dir is not None:
        _writable_dir(Path(settings.adapt_dir))
    served = load_models(list(settings.models), classes=settings.classes, recolour=settings.recolour,
                         ood_accept=settings.ood_accept, adapted=adapted_model_dirs(settings.adapt_dir))
    store = HistoryStore(settings.db_path())
    if settings.retention_days is not None:
        store.purge(older_than_days=settings.retention_days)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import threading

        # Analyses run in this bounded pool of threads, never on the event loop; at most
        # `workers` of them decode or explain at once; the model runs in one batching thread per
        # model, on the images of every request waiting for it.
        app.state.limiter = anyio.CapacityLimiter(settings.max_concurrent)
        app.state.cpu_slots = threading.BoundedSemaphore(settings.workers)
        app.state.adapting = threading.Lock()  # one adaptation at a time: it holds its images and the CPUs
        for served_model in served.values():
            await start_batcher(served_model, settings)
        try:
            yield
        finally:
            for served_model in app.state.models.values():  # models adapted meanwhile too
                await served_model.batcher.stop()
            store.close()

    app = FastAPI(
        title="hematoscope",
        version=__version__,
        description="Classify single blood-cell images, explain, count and keep a history. "
                    "Research use only: every result must be reviewed by a qualified person.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.models, app.state.store = settings, served, store
    app.state.pixel_budget = PixelBudget(settings.max_decoded_pixels)

    # The last added runs first: Host check, then the cross-site guard, then the size limit.
    app.add_middleware(_UploadLimit, max_bytes=settings.max_upload_bytes, max_mb=settings.max_upload_mb,
                       body_timeout_s=settings.body_timeout_s)
    app.add_middleware(_SameOriginGuard, allowed_origins=settings.allowed_origins)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts(), www_redirect=False)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        # FastAPI's own handler echoes the input back, and a NaN or 1e999 in a JSON body made
        # that echo unserialisable: a 500 instead of the 422 the request deserves
        return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(exc.errors()))})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if isinstance(exc.__cause__, _BodyTimeout):  # FastAPI reports a body it could not read as a 400
            return _body_timeout_response(settings.body_timeout_s)
        return await http_exception_handler(request, exc)

    api = APIRouter(prefix="/api")
    for module in (predict, models, analyses, health):
        api.include_router(module.router)
    app.include_router(api, max_body_size=settings.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


def _writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check that models can be saved in it, at start-up rather
    than at the first adaptation."""
    import os

    from hematoscope.serve.deps import ServeError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServeError(f"--adapt-dir {path}: cannot create it ({exc.strerror or exc})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ServeError(f"--adapt-dir {path}: not a folder this server can write models into")


class _BodyTimeout(Exception):
    """The client sent no part of its request body for ``body_timeout_s``."""


class _UploadLimit:
    """Refuse a request whose declared size is over the limit before reading it, with a message
    that names the limit, and one whose body stalls (a client that sends the headers and part of
    a body, then nothing: it would hold a connection and a worker) with 408. (The API routes'
    ``max_body_size`` also stops bodies sent without a Content-Length once they pass the limit.)"""

    def __init__(self, app: ASGIApp, max_bytes: int, max_mb: float, body_timeout_s: float = 30.0):
        self.app, self.max_bytes, self.max_mb, self.timeout = app, max_bytes, max_mb, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(status_code=413, content={
                "detail": f"upload is {int(length) / 2**20:.1f} MB, more than the {self.max_mb:g} MB limit "
                          "(server option --max-upload-mb)"})
            await response(scope, receive, send)
            return
        started, body_done = False, False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # e.g. waiting for a disconnect while a response streams: no limit
                return await receive()
            try:
                with anyio.fail_after(self.timeout):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except _BodyTimeout:
            if not started:
                await _body_timeout_response(self.timeout)(scope, receive, send)


def _body_timeout_response(seconds: float) -> JSONResponse:
    return JSONResponse(status_code=408, content={"detail": f"no part of the request body arrived for {seconds:g} s"},
                        headers={"Connection": "close"})


#: Methods that change state: the cross-site guard checks them (reads stay open to links).
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _SameOriginGuard:
    """Cross-site request forgery guard: a state-changing request sent by a browser page of
    another site is refused with 403.

    Browsers send ``Origin`` with every cross-origin POST (and ``Referer`` unless told not to);
    a page on ``attacker.example`` cannot forge them. A request passes when its ``Origin`` (or,
    lacking one, its ``Referer``) is this server (same host and port as the ``Host`` header,
    either scheme, so a TLS reverse proxy in front works) or one of ``allowed_origins``.
    Requests with neither header (curl, scripts, the Python client) pass: they are not sent by a
    browser on a user's behalf. ``Origin: null`` (sandboxed frames, some redirects) is refused.
    """

    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app, self.allowed = app, frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            reason = self._refusal(dict(scope["headers"]))
            if reason:
                await JSONResponse(status_code=403, content={"detail": reason})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[bytes, bytes]) -> str | None:
        origin = headers.get(b"origin")
        header = "Origin"
        if origin is None:
            referer = headers.get(b"referer")
            if referer is None:
                return None
            from urllib.parse import urlsplit

            header, parts = "Referer", urlsplit(referer.decode("latin-1"))
            origin = f"{parts.scheme}://{parts.netloc}".encode("latin-1")
        text = origin.decode("latin-1")
        given = normalise_origin(text)
        if given is not None and (given in self.allowed or self._same_host(given, headers.get(b"host", b""))):
            return None
        return (f"cross-site request refused: {header} {text!r} is not this server; a page of another site "
                "cannot change data here (server option --allowed-origin adds a trusted site)")

    @staticmethod
    def _same_host(origin: str, host: bytes) -> bool:
        """The origin names the host and port of the ``Host`` header (the scheme may differ:
        behind a TLS proxy the browser says https while the server sees http)."""
        scheme, _, netloc = origin.partition("://")
        default = "443" if scheme == "https" else "80"
        o_host, o_port = _split_host_port(netloc, default)
        h_host, h_port = _split_host_port(host.decode("latin-1").lower(), default)
        return o_host == h_host and o_port == h_port


def _split_host_port(netloc: str, default_port: str) -> tuple[str, str]:
    if netloc.startswith("["):  # [::1]:8000
        host, _, rest = netloc.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else default_port
    host, _, port = netloc.partition(":")
    return host, port or default_port


def _finite(value):
    """``value`` with every NaN or infinite float written as text (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
