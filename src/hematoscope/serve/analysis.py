"""One upload → one analysis: unpack zips safely, decode, classify, explain, make thumbnails.

Everything here is synchronous and CPU-bound; the predict route runs it in the worker pool.
Decoded pixels are bounded per request (sizes read from the headers before decoding) and per
server (a shared :class:`PixelBudget` that every batch reserves from), because a small upload
can hold huge images: a 100 KB PNG of one flat colour may decode to 25 megapixels (75 MB).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from hematoscope._extras import MissingExtraError, install_hint
from hematoscope.data import decode as _decode
from hematoscope.serve.batching import bundle_at
from hematoscope.serve.deps import ServedModel
from hematoscope.serve.storage import StoredItem

if TYPE_CHECKING:
    from hematoscope.bundle.prediction import Explanation

THUMBNAIL_SIDE = 192
#: Longest side of the stored full-size view of each cell (what a reviewer opens from its card):
#: PBC's 360 px crops and most labs' are kept at their own resolution.
VIEW_SIDE = 768
HEATMAP_SIDE = 192
#: Images explained per Grad-CAM call (bounds the memory of the backward pass).
EXPLAIN_BATCH = 16
#: Most images decoded and classified together in one request.
BATCH_IMAGES = 32


class UploadError(ValueError):
    """The upload as a whole is refused (unsafe zip, too many files, nothing readable)."""


class UploadTooLarge(UploadError):
    """The upload would decode to more pixels than the server allows (answered with 413)."""


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes
    error: str | None = None  # why it cannot be read, known before decoding (a damaged zip)


def expand_uploads(files: Sequence[tuple[str, bytes]], *, max_files: int, max_unpacked_bytes: int) -> list[Upload]:
    """Uploaded files → images to classify; zips are replaced by their members.

    Zip members are validated with :mod:`hematoscope.data.archive` (no traversal, links or
    bombs) before anything is read. macOS resource forks (``__MACOSX/``) are left out.

    A zip that cannot be opened (damaged, or not a zip) comes back as one upload with its
    ``error``, answered as an unreadable file.

    Raises:
        UploadError: an unsafe zip (traversal, links, bomb), more than ``max_files`` images, or
            zips that unpack to more than ``max_unpacked_bytes``.
    """
    from hematoscope.data.archive import UnsafeArchiveError, open_zip, read_member, safe_members

    out: list[Upload] = []
    unpacked = 0
    for name, data in files:
        if not name.lower().endswith(".zip"):
            out.append(Upload(name, data))
            continue
        try:
            zf = open_zip(io.BytesIO(data))
        except UnsafeArchiveError as exc:  # damaged or not a zip: this file is unreadable, the rest are answered
            out.append(Upload(name, data, error=str(exc)))
            continue
        try:
            with zf:
                members = [m for m in safe_members(zf) if not m.name.startswith("__MACOSX/")]
                unpacked += sum(m.info.file_size for m in members)
                if unpacked > max_unpacked_bytes:
                    raise UploadError(f"{name}: zip unpacks to more than {max_unpacked_bytes // 2**20} MB "
                                      "(limit: 8 x the upload limit)")
                if len(out) + len(members) > max_files:
                    raise UploadError(f"more than {max_files} images in one request")
                out.extend(Upload(f"{name}/{m.name}", read_member(zf, m)) for m in members)
        except UnsafeArchiveError as exc:
            raise UploadError(f"{name}: {exc}") from None
    if len(out) > max_files:
        raise UploadError(f"{len(out)} images in one request (limit {max_files})")
    if not out:
        raise UploadError("no files in the upload")
    return out


def data_url(data: bytes | None, mime: str) -> str | None:
    return None if data is None else f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _thumbnail(image: np.ndarray, side: int = THUMBNAIL_SIDE, quality: int = 85) -> bytes:
    from PIL import Image

    im = Image.fromarray(image)
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _views(data: bytes, max_pixels: int, explanation: Explanation | None) -> tuple[bytes | None, bytes | None]:
    """The upload at up to :data:`VIEW_SIDE` px (the model's image is already shrunk towards its
    input size) and, when its explanation has a map (a heatmap or outlines), that map drawn over it
    at the same size; None where the upload cannot be decoded again."""
    from hematoscope.data.images import ImageError, load_image

    try:
        view = load_image(data, max_pixels=max_pixels, draft_size=VIEW_SIDE)
    except ImageError:
        return None, None
    shown = _thumbnail(view, VIEW_SIDE, 90)
    from hematoscope.explain.overlay import draw_explanation

    drawn = draw_explanation(explanation, view, max_side=VIEW_SIDE) if explanation is not None else None
    return shown, None if drawn is None else _thumbnail(drawn, VIEW_SIDE, 90)


def explanation_method(model: ServedModel) -> str:
    """What the server can show to explain this model's predictions ("none" when the kind has
    no explanation or its libraries are not installed on the server)."""
    methods = model.bundle.available_explanations
    return methods[0] if methods else "none"


def _explain(model: ServedModel, images: list[np.ndarray], predicted: list[int], framings: list[float] | None = None
             ) -> list[tuple[bytes | None, dict[str, Any], Explanation | None]]:
    """(overlay PNG or None, explanation dict, the explanation or None) per image; ``framings``:
    the framing each answer came from, which the explanation then shows."""
    note = f"explanations are not available for {model.bundle.kind!r} models"
    try:
        explainer = model.explainer()
    except MissingExtraError as exc:  # e.g. Grad-CAM without the explain extra: answers as usual, no heatmap
        explainer = None
        note = f"explanations need the optional '{exc.extra}' extra on the server: {install_hint(exc.extra)}"
    if explainer is None:
        return [(None, {"method": "none", "note": note}, None) for _ in images]
    out = []
    for i in range(0, len(images), EXPLAIN_BATCH):
        for e in explainer.explain(images[i:i + EXPLAIN_BATCH], predicted[i:i + EXPLAIN_BATCH], max_side=HEATMAP_SIDE,
                                   framings=None if framings is None else framings[i:i + EXPLAIN_BATCH]):
            out.append((e.png, e.to_dict(), e))
    return out


class PixelBudget(_decode.PixelBudget):
    """Decoded pixels the whole server may hold at once, shared by every request.

    A request reserves the pixels of one batch before decoding it and gives them back when the
    batch is classified; a reservation that does not fit waits until other requests give theirs
    back. Memory for decoded images is thus bounded by the budget, however many requests come.
    """

    def reserve(self, pixels: int):
        """Hold ``pixels`` of the budget for the block (waits until they are free).

        Raises:
            UploadTooLarge: ``pixels`` is more than the whole budget.
        """
        if pixels > self.capacity:
            raise UploadTooLarge(f"one batch needs {pixels / 1e6:.1f} megapixels, more than the server's "
                                 f"{self.capacity / 1e6:g} megapixel decode budget")
        return super().reserve(pixels)


def _batches(sizes: list[tuple[int, int]], *, max_images: int, max_pixels: int) -> Iterator[list[tuple[int, int]]]:
    """Consecutive runs of (position, pixels) with at most ``max_images`` images and, unless a
    single image is larger, at most ``max_pixels`` pixels."""
    batch: list[tuple[int, int]] = []
    total = 0
    for pos, px in sizes:
        if batch and (len(batch) == max_images or total + px > max_pixels):
            yield batch
            batch, total = [], 0
        batch.append((pos, px))
        total += px
    if batch:
        yield batch


def header_pixels(up: Upload, max_pixels: int) -> int:
    """The pixels ``up`` will decode to, read from its header without decoding it.

    Raises:
        ImageError: not an image file by its name, no readable header, no pixels, or more
            than ``max_pixels`` (the reason says which).
    """
    from hematoscope.data.images import ImageError, image_size, is_image_file

    suffix = PurePosixPath(up.name).suffix
    if not is_image_file(up.name) and suffix:
        raise ImageError(f"not an image file ({suffix})")
    w, h = image_size(up.data)
    if w <= 0 or h <= 0:
        raise ImageError("image has no pixels")
    if w * h > max_pixels:
        raise ImageError(f"image too large ({w}x{h} > {max_pixels} pixels)")
    return w * h


def run_analysis(model: ServedModel, uploads: Sequence[Upload], *, top_k: int, explain: bool,
                 max_pixels: int, explain_max: int, max_request_pixels: int | None = None,
                 budget: PixelBudget | None = None, batch_pixels: int | None = None,
                 batch_size: int = BATCH_IMAGES, classify=None, ood_accept: float | str | None = None,
                 cpu_slots: threading.Semaphore | None = None) -> tuple[list[StoredItem], dict]:
    """Classify uploaded images with one model, decoding them batch by batch.

    Image sizes are read from the headers first, so an upload that would decode to more than
    ``max_request_pixels`` is refused before any pixel is decoded. Then batches of at most
    ``batch_size`` images and ``batch_pixels`` pixels are decoded, classified, explained,
    thumbnailed and kept at up to :data:`VIEW_SIDE` px one after the other, each within a
    reservation of the server-wide ``budget``; only one batch of decoded images is held at a time.

    Args:
        model: the served model.
        uploads: the files, in the order they are reported.
        top_k: classes listed per image.
        explain: compute heatmaps/overlays (for the first ``explain_max`` readable images).
        max_pixels: images larger than this are reported as errors.
        explain_max: most images explained per request.
        max_request_pixels: most pixels of all images together (None: no limit).
        budget: the server's decode budget (None: no shared budget).
        batch_pixels: most pixels decoded at once by this request (default: the budget's
            capacity, or no bound without a budget).
        batch_size: most images per batch.
        classify: ``(images, names) -> Prediction``, the model call (default: the bundle's
            ``predict_arrays``; the server passes its batcher, which joins other requests' images).
        ood_accept: the OOD flag's operating point for the default ``classify``
            (:func:`~hematoscope.serve.batching.bundle_at`; None: as the bundle is served).
        cpu_slots: held while decoding and while making thumbnails and explanations (not while
            waiting for the model), so that at most that many threads do such work at once.

    Returns:
        (items in upload order, the batch's differential count as a dict).

    Raises:
        UploadTooLarge: the images hold more than ``max_request_pixels`` pixels.
        UploadError: no image in the upload can be read.
    """
    from hematoscope.bundle import Prediction, SkippedFile
    from hematoscope.data.images import ImageError, load_model_image

    items: list[StoredItem] = []
    sizes: list[tuple[int, int]] = []  # (position, pixels) of the files that look decodable
    skipped: list[SkippedFile] = []

    def fail(pos: int, reason: str) -> None:
        skipped.append(SkippedFile(uploads[pos].name, reason))
        items[pos].result = {"error": reason}

    for pos, up in enumerate(uploads):
        items.append(StoredItem(up.name, hashlib.sha256(up.data).hexdigest(), {}))
        if up.error is not None:
            fail(pos, up.error)
            continue
        try:
            sizes.append((pos, header_pixels(up, max_pixels)))
        except ImageError as exc:
            fail(pos, exc.reason)
    total = sum(px for _, px in sizes)
    if max_request_pixels is not None and total > max_request_pixels:
        raise UploadTooLarge(f"the images of this upload hold {total / 1e6:.1f} megapixels, more than the "
                             f"{max_request_pixels / 1e6:g} megapixel limit per request (server option "
                             "--max-request-megapixels); send fewer or smaller images")

    if batch_pixels is None:
        batch_pixels = budget.capacity if budget is not None else max(total, 1)
    at_point = bundle_at(model.bundle, ood_accept)
    if classify is None:
        classify = at_point.predict_arrays

    @functools.cache
    def ood_limit(views: int | None) -> float | None:
        """The score above which a cell answered from ``views`` views is flagged (thresholds are
        fitted per view count and moved by the operating point), for the page to compare with."""
        threshold = at_point.trust_for(views).ood_threshold if at_point.ood is not None else None
        return None if threshold is None else round(float(threshold), 6)
    slots = cpu_slots if cpu_slots is not None else nullcontext()
    preds: list[Prediction] = []
    explained = 0
    for batch in _batches(sizes, max_images=batch_size, max_pixels=batch_pixels):
        reserved = sum(px for _, px in batch)
        with budget.reserve(reserved) if budget is not None else nullcontext():
            images, positions = [], []
            with slots:
                for pos, _ in batch:
                    try:
                        images.append(load_model_image(uploads[pos].data, model.bundle.preprocess,
                                                       max_pixels=max_pixels))
                        positions.append(pos)
                    except ImageError as exc:
                        fail(pos, exc.reason)
            if not images:
                continue
            pred = classify(images, [uploads[p].name for p in positions])
            predicted = pred.probs.argmax(1).tolist()
            n_explain = max(0, min(len(images), explain_max - explained)) if explain else 0
            with slots:
                # the framing search answers some cells from another framing: their maps show that view
                framings = None if pred.framing is None else \
                    [model.bundle.preprocess.framing * float(f) for f in pred.framing[:n_explain]]
                overlays = _explain(model, images[:n_explain], predicted[:n_explain], framings) if n_explain else []
                thumbnails = [_thumbnail(im) for im in images]
                views = [_views(uploads[pos].data, max_pixels, overlays[n][2] if n < len(overlays) else None)
                         for n, pos in enumerate(positions)]
            explained += n_explain
            for n, (pos, record, top) in enumerate(zip(positions, pred.records(top_k), pred.top_k(top_k))):
                overlay, explanation, _ = overlays[n] if n < len(overlays) else (None, None, None)
                items[pos].result = {
                    "prediction": record["prediction"],
                    "confidence": record["confidence"],
                    "top_k": [{"label": lab, "prob": round(p, 6)} for lab, p in top],
                    "abstain": record["abstain"],
                    "abstain_reason": record["abstain_reason"] or None,
                    "ood_score": record["ood_score"],
                    "ood_flag": record["ood_flag"],
                    "ood_limit": ood_limit(record.get("views")),
                    "views": record.get("views"),
                    "framing": record.get("framing"),
                    "recolour": record.get("recolour"),
                    "explanation": explanation,
                }
                items[pos].thumbnail, (items[pos].view, items[pos].heatmap_view) = thumbnails[n], views[n]
                items[pos].heatmap = overlay
            preds.append(pred)
            del images  # the batch's pixels go before the next reservation
    if not preds:
        reasons = "; ".join(map(str, skipped[:20]))
        raise UploadError(f"no readable image in the upload ({reasons})")
    pred = Prediction.concat(preds, model.bundle.labels)
    pred.skipped = skipped
    return items, pred.differential().to_dict()


def corrected_differential(labels: list[str], items: Sequence[StoredItem], corrections: dict[int, dict]) -> dict:
    """The differential count after applying the user's corrections: a corrected image counts
    as its corrected class (even when the model had abstained)."""
    counts = {lab: 0 for lab in labels}
    abstained, reasons, skipped = 0, {}, 0
    for i, it in enumerate(items):
        res = it.result
        if "error" in res:
            skipped += 1
        elif i in corrections:
            counts[corrections[i]["label"]] += 1
        elif res["abstain"]:
            abstained += 1
            why = res["abstain_reason"] or "abstained"
            reasons[why] = reasons.get(why, 0) + 1
        else:
            counts[res["prediction"]] += 1
    from hematoscope.bundle import DifferentialCount

    return DifferentialCount(labels, counts, abstained, reasons, skipped).to_dict()
