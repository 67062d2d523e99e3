"""POST /api/predict: classify an upload of images and/or zips, store it as an analysis."""
from __future__ import annotations

from typing import Annotated

import anyio.from_thread
import anyio.to_thread
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile, status

from hematoscope.serve.analysis import UploadError, UploadTooLarge, expand_uploads, run_analysis
from hematoscope.serve.batching import AS_FITTED, Overloaded
from hematoscope.serve.deps import ModelsDep, SettingsDep, StoreDep, pick_model, require_token
from hematoscope.serve.routes.analyses import analysis_response
from hematoscope.serve.schemas import Analysis
from hematoscope.serve.storage import clean_sample

router = APIRouter(prefix="/predict", tags=["predict"], dependencies=[Depends(require_token)])


@router.post("", response_model=Analysis, responses={
    413: {"description": "upload larger than the configured limit, or its images hold more pixels than allowed"},
    422: {"description": "unsafe zip, too many files, or no readable image"},
    503: {"description": "the server is busy (too many images waiting for the model): retry after Retry-After "
                         "seconds"},
})
async def predict(
    request: Request,
    files: Annotated[list[UploadFile], File(description="images and/or .zip archives of images")],
    settings: SettingsDep,
    store: StoreDep,
    models: ModelsDep,
    model: Annotated[str | None, Query(description="served model name (default: the first)")] = None,
    top_k: Annotated[int, Query(ge=1, le=50, description="classes listed per image")] = 3,
    gradcam: Annotated[bool, Query(description="add an explanation heatmap per image")] = False,
    ood_accept: Annotated[str | None, Query(max_length=20, description="this analysis only: move the unlike-training "
                                            "flag to accept this share of the model's validation cells, one of its "
                                            "ood_accept_levels (GET /api/models); higher sets fewer cells aside and "
                                            "lets more damaged ones through; 'fitted': the flag as fitted, on a "
                                            "server started with --ood-accept; omitted: as the model is "
                                            "served")] = None,
    sample: Annotated[str, Form(max_length=1000, description="the lab's sample / slide id, stored with the "
                                "analysis (at most 100 characters, no line breaks)")] = "",
) -> Analysis:
    """Classify every image (zips are unpacked safely) and store the analysis.

    Unreadable files are answered as per-file errors; the rest of the batch is classified. The
    whole request is refused (422) only when a zip is unsafe, there are too many images or none
    of them can be read.
    """
    served = pick_model(models, model)
    try:
        sample = clean_sample(sample)  # refused before any image is decoded
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    ood_accept = operating_point(ood_accept, served)
    point = {None: served.bundle.config.ood_accept, AS_FITTED: None}.get(ood_accept, ood_accept)
    limiter = request.app.state.limiter
    if limiter.borrowed_tokens >= limiter.total_tokens and limiter.statistics().tasks_waiting >= limiter.total_tokens:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the server is busy: too many analyses waiting; "
                            "try again shortly", headers={"Retry-After": "1"})
    # Each of the `workers` concurrent decoders may hold its share of the server's decode budget.
    batch_pixels = max(settings.max_image_pixels, settings.max_decoded_pixels // settings.workers)
    raw = [(f.filename or f"upload_{i}", await f.read()) for i, f in enumerate(files)]
    batcher = served.batcher

    def model_call(images, names):
        # from this worker thread to the event loop, where the batcher joins other requests' images
        return anyio.from_thread.run(batcher.predict, images, names, ood_accept)

    def classify():
        uploads = expand_uploads(raw, max_files=settings.max_files,
                                 max_unpacked_bytes=8 * settings.max_upload_bytes)
        return run_analysis(served, uploads, top_k=top_k, explain=gradcam, max_pixels=settings.max_image_pixels,
                            explain_max=settings.gradcam_max, max_request_pixels=settings.max_request_pixels,
                            budget=request.app.state.pixel_budget, batch_pixels=batch_pixels,
                            classify=model_call if batcher is not None else None, ood_accept=ood_accept,
                            cpu_slots=request.app.state.cpu_slots)

    def save(items, differential):
        analysis_id = store.add_analysis({**served.info(), "ood_accept": point}, served.bundle.labels, differential,
                                         items, sample=sample)
        if settings.retention_days is not None:
            store.purge(older_than_days=settings.retention_days)
        return store.get(analysis_id)

    try:
        items, differential = await anyio.to_thread.run_sync(classify, limiter=limiter)
    except Overloaded as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc),
                            headers={"Retry-After": str(exc.retry_after)}) from None
    except UploadTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except UploadError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    # Database writes wait for the database, not for an inference worker.
    return analysis_response(await anyio.to_thread.run_sync(save, items, differential))


def operating_point(text: str | None, served) -> float | str | None:
    """A request's ``ood_accept``: None, :data:`AS_FITTED` or one of the model's stored shares.

    Raises:
        HTTPException: 422 for anything else.
    """
    if text is None or text.strip().lower() == AS_FITTED:
        return None if text is None else AS_FITTED
    levels = served.bundle.ood_accept_shares()
    try:
        share = float(text)
    except ValueError:
        share = None
    if share not in levels:
        can = f"one of {', '.join(f'{q:g}' for q in levels)}" if levels else "not moved: its flag has no stored levels"
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"ood_accept {text} is not an operating point of model {served.name!r}: {can}, or "
                            f"{AS_FITTED!r}")
    return share
