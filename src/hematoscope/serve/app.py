"""The web app: REST API under /api, the single-page UI at /, OpenAPI docs at /docs."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from hematoscope.serve.config import Settings
from hematoscope.serve.deps import load_models
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

    settings = settings if settings is not None else Settings()
    served = load_models(list(settings.models))
    store = HistoryStore(settings.db_path())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Inference and database work run in this bounded pool, never on the event loop.
        app.state.limiter = anyio.CapacityLimiter(settings.workers)
        yield

    app = FastAPI(
        title="hematoscope",
        version=__version__,
        description="Classify single blood-cell images, explain, count and keep a history. "
                    "Research use only: every result must be reviewed by a qualified person.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.models, app.state.store = settings, served, store

    app.add_middleware(_UploadLimit, max_bytes=settings.max_upload_bytes, max_mb=settings.max_upload_mb)

    api = APIRouter(prefix="/api")
    for module in (predict, models, analyses, health):
        api.include_router(module.router)
    app.include_router(api, max_body_size=settings.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


class _UploadLimit:
    """Refuse a request whose declared size is over the limit before reading it, with a message
    that names the limit. (The API routes' ``max_body_size`` also stops bodies sent without a
    Content-Length once they pass the limit.)"""

    def __init__(self, app: ASGIApp, max_bytes: int, max_mb: float):
        self.app, self.max_bytes, self.max_mb = app, max_bytes, max_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse(status_code=413, content={
                    "detail": f"upload is {int(length) / 2**20:.1f} MB, more than the {self.max_mb:g} MB limit "
                              "(server option --max-upload-mb)"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
