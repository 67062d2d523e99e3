"""GET /api/health: liveness for monitors (no token needed; the history count only with it)."""
from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request

from hematoscope.serve.deps import ModelsDep, StoreDep, require_token
from hematoscope.serve.schemas import Health

router = APIRouter(prefix="/health", tags=["health"])


@router.get("", response_model=Health)
async def health(request: Request, models: ModelsDep, store: StoreDep) -> Health:
    """Server status and the served model names. How many analyses are stored is told only to a
    caller who may read the history (with the token, when one is set); otherwise ``analyses``
    is null."""
    from hematoscope import __version__

    batching = None
    try:
        require_token(request)
    except HTTPException:
        total = None
    else:
        _, total = await anyio.to_thread.run_sync(lambda: store.list(limit=1))
        batching = {name: m.batcher.stats.to_dict() for name, m in models.items() if m.batcher is not None}
    return Health(status="ok", version=__version__, models=list(models), analyses=total, batching=batching)
