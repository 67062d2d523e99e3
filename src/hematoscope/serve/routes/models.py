"""GET /api/models: the served bundles; POST /api/models/adapt: adapt one to a lab's crops."""
from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, Response, UploadFile, status

from hematoscope.serve.analysis import explanation_method
from hematoscope.serve.batching import start_batcher
from hematoscope.serve.deps import ModelsDep, ServedModel, SettingsDep, is_adapted_here, pick_model, require_token
from hematoscope.serve.schemas import AdaptResult, ModelInfo, ModelList

log = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(require_token)])

#: A new model's name: also its folder in the adaptation directory, so nothing a path could abuse.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: `adapt --tune` epochs, as the CLI's default.
TUNE_EPOCHS = 8


def model_info(name: str, m: ServedModel, default: str, adapt_dir: Path | None) -> ModelInfo:
    """A served model as ``GET /api/models`` lists it (``adapt_dir``: the server's adaptation folder)."""
    d = m.bundle.describe()
    return ModelInfo(
        **m.info(), default=name == default, labels=d["labels"], input_size=d["input_size"],
        temperature=d["temperature"], abstain_threshold=d["abstain_threshold"], ood=d["ood"],
        ood_accept=d["ood_accept"], ood_accept_levels=m.bundle.ood_accept_shares(), metrics=d["metrics"],
        metrics_of=d["metrics_of"],
        explanation=explanation_method(m), adapted_to=d["adapted_to"], answerable_classes=d["answerable_classes"],
        removable=is_adapted_here(m, adapt_dir), adaptable=m.bundle.adaptable, framing=d["framing"], ood_limits=d["ood_limits"],
    )


@router.get("", response_model=ModelList)
def list_models(models: ModelsDep, settings: SettingsDep) -> ModelList:
    """Every served model (the first is the default), with its classes and trust settings."""
    default = next(iter(models))
    return ModelList(data=[model_info(name, m, default, settings.adapt_dir) for name, m in models.items()],
                     default=default,
                     can_adapt=settings.adapt_dir is not None and any(m.bundle.adaptable for m in models.values()))


@router.post("/adapt", response_model=AdaptResult, responses={
    403: {"description": "adapting from the web app is off (hematoscope serve --adapt-dir turns it on)"},
    409: {"description": "the name is taken, or another adaptation is running"},
    413: {"description": "the crops hold more pixels than one adaptation may decode"},
    422: {"description": "a bad name or classes, an unsafe zip, or too few readable crops"},
    501: {"description": "the server lacks the libraries adaptation needs (the train extra)"},
})
async def adapt_model(
    request: Request,
    files: Annotated[list[UploadFile], File(description="the lab's unlabelled cell crops: images and/or .zip "
                                             "archives (a few hundred; at least 50 readable)")],
    settings: SettingsDep,
    models: ModelsDep,
    name: Annotated[str, Form(description="the new model's name (letters, digits, . _ -; at most 64)")],
    base: Annotated[str, Form(description="served model to adapt (default: the first)")] = "",
    source: Annotated[str, Form(max_length=1000, description="what the crops are, e.g. the lab and "
                                "microscope; recorded in the model")] = "",
    classes: Annotated[str, Form(description="comma-separated classes the crops can hold; with tune")] = "",
    tune: Annotated[bool, Form(description="also tune the network on the crops among `classes` "
                               "(adapt --tune; about a minute for 300 crops)")] = False,
) -> AdaptResult:
    """Adapt a served model to a lab from its unlabelled crops, as ``hematoscope adapt`` does
    (framing chosen, normalisation statistics and the out-of-distribution reference refitted;
    with ``tune``, the network tuned among ``classes``), save it in the server's adaptation
    folder and serve it from now on. The request returns when the model is ready."""
    if settings.adapt_dir is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "adapting from the web app is off; start the server with "
                            "--adapt-dir DIR (or run hematoscope adapt, then serve the new model)")
    original = pick_model(models, base)
    if not MODEL_NAME.fullmatch(name):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "a model name has 1-64 letters, digits, '.', "
                            "'_' or '-', and starts with a letter or digit")
    source = source.strip()
    if len(source) > 100 or any(unicodedata.category(ch).startswith("C") for ch in source):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the source has at most 100 characters and no "
                            "control characters")
    wanted = [c.strip() for c in classes.split(",") if c.strip()] or None
    if tune and not wanted:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "tuning needs the classes the crops can hold "
                            "(e.g. basophil,eosinophil,lymphocyte,monocyte,neutrophil)")
    out = Path(settings.adapt_dir) / name
    if name in models or out.exists():
        raise HTTPException(status.HTTP_409_CONFLICT, f"a model named {name!r} exists already; choose another name")
    lock = request.app.state.adapting
    if not lock.acquire(blocking=False):
        raise HTTPException(status.HTTP_409_CONFLICT, "another adaptation is running; try again when it is done")
    try:
        raw = [(f.filename or f"upload_{i}", await f.read()) for i, f in enumerate(files)]
        adapted = await anyio.to_thread.run_sync(
            lambda: _adapt(request, settings, original, raw, out, name=name, source=source or "crops uploaded to "
                           "the web app", classes=wanted, tune=tune), limiter=request.app.state.limiter)
    finally:
        lock.release()
    served, report = adapted
    await start_batcher(served, settings)
    # a new dict, not an insertion: requests iterating the old one are not disturbed
    request.app.state.models = {**request.app.state.models, served.name: served}
    return AdaptResult(model=model_info(served.name, served, next(iter(request.app.state.models)), settings.adapt_dir),
                       images=report.images, skipped=[str(s) for s in report.skipped],
                       seconds=report.seconds, framing=served.bundle.preprocess.framing,
                       accepted_before=report.accepted_before, accepted_after=report.accepted_after,
                       class_mix=report.class_mix or None)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, responses={
    403: {"description": "not a model adapted from the web app (the operator's --model bundles stay)"},
    404: {"description": "no served model of that name"},
})
async def remove_model(name: str, request: Request, settings: SettingsDep, models: ModelsDep) -> Response:
    """Stop serving a model adapted from the web app and delete its folder. Analyses made with
    it stay in the history; requests waiting for it get 503."""
    import shutil
    import uuid

    served = pick_model(models, name)
    if not is_adapted_here(served, settings.adapt_dir):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{name!r} was not adapted from the web app; only those "
                            "can be removed here (the server's --model bundles are its operator's)")
    request.app.state.models = {k: v for k, v in request.app.state.models.items() if k != name}
    if served.batcher is not None:
        await served.batcher.retire()
    folder = Path(served.bundle.path)
    # renamed first: the name is free at once, and a removal cut short leaves no model to serve
    gone = folder.with_name(f".removing-{folder.name}-{uuid.uuid4().hex[:8]}")
    await anyio.to_thread.run_sync(lambda: (folder.rename(gone), shutil.rmtree(gone, ignore_errors=True)))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _adapt(request: Request, settings, original: ServedModel, raw, out: Path, *, name: str, source: str,
           classes, tune: bool):
    """The work of :func:`adapt_model`, in a worker thread: unpack, check the pixels, adapt, save
    (with an ONNX export when the original had one and the server can make it), load."""
    from hematoscope._extras import MissingExtraError
    from hematoscope.bundle import load_bundle
    from hematoscope.bundle.adapt import adapt_bundle
    from hematoscope.data.images import ImageError
    from hematoscope.data.sources import SkippedFile
    from hematoscope.export.onnx import save_adapted
    from hematoscope.serve.analysis import UploadError, expand_uploads, header_pixels
    from hematoscope.serve.deps import load_models

    try:
        uploads = expand_uploads(raw, max_files=settings.max_files, max_unpacked_bytes=8 * settings.max_upload_bytes)
    except UploadError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    # checked as an analysis checks its files: those refused here reach adapt as skipped files
    items, pixels = [], 0
    for up in uploads:
        try:
            pixels += header_pixels(up, settings.max_image_pixels)
            items.append((up.name, up.data))
        except ImageError as exc:
            items.append(SkippedFile(up.name, exc.reason))
    budget = request.app.state.pixel_budget
    if pixels > min(settings.max_request_pixels, budget.capacity):
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"the crops hold {pixels / 1e6:.1f} megapixels, more "
                            f"than the {min(settings.max_request_pixels, budget.capacity) / 1e6:g} one adaptation may "
                            "decode; send fewer or smaller crops (a few hundred are enough)")
    # from the bundle as saved: the server's own settings (--classes, --recolour, --ood-accept) stay
    # out of the new model's files, and the served copy is left to its requests
    base = load_bundle(original.bundle.path) if original.bundle.path else original.bundle
    try:
        with budget.reserve(pixels):  # adaptation holds all its crops decoded at once
            adapted, report = adapt_bundle(base, items, source=source,
                                           name=name, classes=classes, tune_epochs=TUNE_EPOCHS if tune else 0)
    except MissingExtraError as exc:
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, f"this server cannot adapt models: {exc}") from None
    except ValueError as exc:  # too few readable crops, unknown classes, a kind that cannot be tuned
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_adapted(adapted, base, out)
    except MissingExtraError as exc:  # saved; served with PyTorch instead of ONNX Runtime
        log.warning("adapted model %s saved without an ONNX export: %s", out, exc)
    served = load_models([out], classes=settings.classes, recolour=settings.recolour,
                         ood_accept=settings.ood_accept)
    return next(iter(served.values())), report
