"""GET /api/health: liveness for monitors (no token needed)."""
from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter

from hematoscope.serve.deps import ModelsDep, StoreDep
from hematoscope.serve.schemas import Health

router = APIRouter(prefix="/health", tags=["health"])


@router.get("", response_model=Health)
async def health(models: ModelsDep, store: StoreDep) -> Health:
    """Server status, the served model names and how many analyses are stored."""
    from hematoscope import __version__

    _, total = await anyio.to_thread.run_sync(lambda: store.list(limit=1))
    return Health(status="ok", version=__version__, models=list(models), analyses=total)
