"""History: list, read, export, correct and delete stored analyses."""
from __future__ import annotations

import csv
import io
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi import Path as FastApiPath

from hematoscope.serve.deps import StoreDep, require_token
from hematoscope.serve.schemas import Analysis, AnalysisList, AnalysisPatch, CorrectionsIn
from hematoscope.serve.storage import NotFound, StoredAnalysis

router = APIRouter(prefix="/analyses", tags=["analyses"], dependencies=[Depends(require_token)])

#: Largest offset SQLite takes (a signed 64-bit integer); beyond it the query is refused (422).
MAX_OFFSET = 2**63 - 1

CSV_COLUMNS = ["sample", "index", "source", "sha256", "prediction", "confidence", "top_k", "abstain", "abstain_reason",
               "ood_score", "ood_flag", "framing", "recolour", "corrected_label", "correction_note", "error",
               "analysis_id", "analysed_at", "model", "ood_accept"]


def analysis_response(a: StoredAnalysis) -> Analysis:
    """A stored analysis as the API shows it (images as data URLs, corrections merged in)."""
    from hematoscope.serve.analysis import corrected_differential, data_url

    items = []
    for i, it in enumerate(a.items):
        res = dict(it.result)
        error = res.pop("error", None)
        items.append({
            "index": i, "source": it.source, "sha256": it.sha256, "error": error, **res,
            "thumbnail": data_url(it.thumbnail, "image/jpeg"),
            "heatmap": data_url(it.heatmap, "image/png"),
            "heatmap_full": it.has_heatmap_view,
            "correction": a.corrections.get(i),
        })
    return Analysis.model_validate({
        "id": a.id, "created": a.created, "sample": a.sample, "model": a.model, "labels": a.labels,
        "n_images": len(a.items), "n_errors": a.n_errors, "differential": a.differential,
        "corrected_differential": corrected_differential(a.labels, a.items, a.corrections) if a.corrections else None,
        "items": items,
    })


async def _get(store, analysis_id: str, images: bool = True) -> StoredAnalysis:
    try:
        return await anyio.to_thread.run_sync(lambda: store.get(analysis_id, images=images))
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no analysis {analysis_id!r}") from None


@router.get("", response_model=AnalysisList)
async def list_analyses(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    sample: Annotated[str | None, Query(max_length=100, description="only analyses whose sample id contains "
                                        "this (ASCII letters in either case)")] = None,
) -> AnalysisList:
    """Past analyses, newest first; ``count`` is how many match."""
    def summaries():
        from hematoscope.serve.analysis import corrected_differential

        rows, total = store.list(limit=limit, offset=offset, sample=(sample or "").strip())
        for row in rows:  # history's main classes as the lab corrected them, not the model's alone
            if row["n_corrections"]:
                try:
                    a = store.get(row["id"], images=False)
                except NotFound:  # deleted since it was listed
                    continue
                row["corrected_differential"] = corrected_differential(a.labels, a.items, a.corrections)
        return rows, total

    rows, total = await anyio.to_thread.run_sync(summaries)
    return AnalysisList.model_validate({"data": rows, "count": total})


@router.get("/{analysis_id}", response_model=Analysis)
async def get_analysis(
    analysis_id: str,
    store: StoreDep,
    images: Annotated[bool, Query(description="include thumbnails and heatmaps (data URLs)")] = True,
) -> Analysis:
    """One analysis with every image's result, thumbnail, heatmap and correction."""
    return analysis_response(await _get(store, analysis_id, images=images))


@router.delete("/{analysis_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses={404: {"description": "no analysis with that id"}})
async def delete_analysis(analysis_id: str, store: StoreDep) -> Response:
    """Delete an analysis: its images (thumbnails, heatmaps), results and corrections."""
    try:
        await anyio.to_thread.run_sync(lambda: store.delete(analysis_id))
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no analysis {analysis_id!r}") from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{analysis_id}/items/{index}/image", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the image, up to 768 px a side"},
                       404: {"description": "no such analysis or image, or the upload could not be read"}})
async def item_image(analysis_id: str, index: Annotated[int, FastApiPath(ge=0, le=MAX_OFFSET)],
                     store: StoreDep) -> Response:
    """One uploaded image at full size (up to 768 px a side: what a reviewer looks at closely;
    the thumbnail for analyses stored before full-size views were kept)."""
    return await _stored_view(store, analysis_id, index, heatmap=False)


@router.get("/{analysis_id}/items/{index}/heatmap", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the heatmap over the image, up to 768 px"},
                       404: {"description": "no such analysis or image, or no full-size heatmap for it "
                                            "(its item's heatmap_full is false)"}})
async def item_heatmap(analysis_id: str, index: Annotated[int, FastApiPath(ge=0, le=MAX_OFFSET)],
                       store: StoreDep) -> Response:
    """The explanation's heatmap of one image drawn over it at full size (what ``/image`` shows),
    where the analysis made one (its item's ``heatmap_full``)."""
    return await _stored_view(store, analysis_id, index, heatmap=True)


async def _stored_view(store, analysis_id: str, index: int, *, heatmap: bool) -> Response:
    try:
        data = await anyio.to_thread.run_sync(lambda: store.view(analysis_id, index, heatmap=heatmap))
    except NotFound:
        what = "full-size heatmap" if heatmap else "image"
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} {index} in analysis {analysis_id!r}") from None
    # a patient's cell: the browser may keep it for the page, shared caches may not
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/{analysis_id}/report.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "one row per uploaded file"}})
async def report_csv(analysis_id: str, store: StoreDep) -> Response:
    """The analysis as CSV: one row per file, with the user's corrections. Text cells that a
    spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR first) get a leading ``'``."""
    from hematoscope._csv import safe_row

    a = await _get(store, analysis_id, images=False)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for i, it in enumerate(a.items):
        res, corr = it.result, a.corrections.get(i, {})
        writer.writerow(safe_row({
            **_identity(a), "index": i, "source": it.source, "sha256": it.sha256,
            "prediction": res.get("prediction", ""), "confidence": res.get("confidence", ""),
            "top_k": "; ".join(f"{t['label']}:{t['prob']:.4f}" for t in res.get("top_k", [])),
            "abstain": res.get("abstain", ""), "abstain_reason": res.get("abstain_reason") or "",
            "ood_score": "" if res.get("ood_score") is None else res["ood_score"],
            "ood_flag": res.get("ood_flag", ""), "framing": "" if res.get("framing") is None else res["framing"],
            "recolour": res.get("recolour") or "",
            "corrected_label": corr.get("label", ""),
            "correction_note": corr.get("note", ""), "error": res.get("error", ""),
        }))
    return _csv_response(buf.getvalue(), a)


DIFFERENTIAL_COLUMNS = ["sample", "class", "count", "percent", "corrected_count", "corrected_percent",
                        "analysis_id", "analysed_at", "model", "ood_accept"]


@router.get("/{analysis_id}/differential.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "one row per class, then abstained "
                                                                       "and unreadable"}})
async def differential_csv(analysis_id: str, store: StoreDep) -> Response:
    """The differential count as CSV, as the model gave it and with the user's corrections:
    one row per class (count and percent of the counted cells), then abstained and unreadable."""
    from hematoscope._csv import safe_row
    from hematoscope.serve.analysis import corrected_differential

    a = await _get(store, analysis_id, images=False)
    corrected = corrected_differential(a.labels, a.items, a.corrections)
    fixed = {c["label"]: c for c in corrected["classes"]}
    rows = [(c["label"], c["count"], f"{c['percent']:.2f}", fixed[c["label"]]["count"],
             f"{fixed[c['label']]['percent']:.2f}") for c in a.differential["classes"]]
    rows += [("abstained", a.differential["abstained"], "", corrected["abstained"], ""),
             ("unreadable", a.differential["skipped"], "", corrected["skipped"], "")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=DIFFERENTIAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for name, count, percent, count_c, percent_c in rows:
        writer.writerow(safe_row({**_identity(a), "class": name, "count": count, "percent": percent,
                                  "corrected_count": count_c, "corrected_percent": percent_c}))
    return _csv_response(buf.getvalue(), a, "-count")


def _identity(a: StoredAnalysis) -> dict[str, str]:
    """The columns of every CSV row that say where it came from, once pasted into a lab sheet
    (``ood_accept``: the flag's operating point when moved after fitting; empty: as fitted)."""
    accept = a.model.get("ood_accept")
    return {"sample": a.sample, "analysis_id": a.id, "analysed_at": a.created, "model": a.model.get("name", ""),
            "ood_accept": "" if accept is None else f"{accept:g}"}


def _csv_response(text: str, a: StoredAnalysis, suffix: str = "") -> Response:
    sample = _file_safe(a.sample) + "-" if a.sample else ""
    filename = f"hematoscope-{a.created[:10]}-{sample}{a.id[:8]}{suffix}.csv"
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _file_safe(text: str) -> str:
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in text)[:40]


@router.patch("/{analysis_id}", response_model=Analysis, responses={404: {"description": "no analysis with that id"}})
async def patch_analysis(analysis_id: str, body: AnalysisPatch, store: StoreDep) -> Analysis:
    """Set the analysis' sample id (e.g. typed after the upload, or corrected)."""
    try:
        await anyio.to_thread.run_sync(lambda: store.set_sample(analysis_id, body.sample))
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no analysis {analysis_id!r}") from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return analysis_response(await _get(store, analysis_id))


@router.patch("/{analysis_id}/corrections", response_model=Analysis, operation_id="patch_corrections")
@router.post("/{analysis_id}/corrections", response_model=Analysis, operation_id="post_corrections")
async def set_corrections(analysis_id: str, body: CorrectionsIn, store: StoreDep) -> Analysis:
    """Record the user's label for images of an analysis (``label: null`` removes it)."""
    triples = [(c.index, c.label, c.note) for c in body.corrections]
    try:
        await anyio.to_thread.run_sync(lambda: store.set_corrections(analysis_id, triples))
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"not found: {exc.args[0]}") from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return analysis_response(await _get(store, analysis_id))
