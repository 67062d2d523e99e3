"""Pipelined prediction: decode images in worker threads while the model runs.

A pool of threads reads, decodes (:func:`hematoscope.data.images.load_image`, with JPEG DCT
scaling when the model input is much smaller than the file) and resizes images to the model's
input size; the calling thread runs the model on one batch while the next batches decode.
Pillow and ONNX Runtime / torch release the GIL for their heavy work, so threads overlap well.
At most ``prefetch + 1`` batches are in flight, so memory stays flat however many images there
are. Results come back in input order; unreadable files become
:class:`~hematoscope.bundle.prediction.SkippedFile` records and the run goes on.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from collections import deque
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from hematoscope.bundle.prediction import Prediction, SkippedFile
from hematoscope.data.archive import UnsafeArchiveError
from hematoscope.data.images import ImageError, load_image
from hematoscope.models.preprocess import Preprocess
from hematoscope.predict.sources import ArchiveReader, ImageSource, expand_paths

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle


@dataclass
class DecodedBatch:
    """A batch of decoded RGB uint8 images with their source names, and the files of the same
    stretch of input that could not be read."""

    images: list[np.ndarray]
    sources: list[str]
    skipped: list[SkippedFile] = field(default_factory=list)


def default_workers() -> int:
    """Decode threads: one per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_resizer(preprocess: Preprocess) -> Callable[[np.ndarray], np.ndarray] | None:
    """The resize that workers may apply before the model's own preprocessing, or None.

    Bundles always apply their full :class:`Preprocess` in ``forward``; resizing early in a
    worker is only an optimisation, allowed when the model's preprocessing then gives exactly
    the pixels it would have given on the original image:

    - ``"squash"``, or ``"shorter_crop"`` without cropping: the resize itself (a second
      application leaves a size x size image as it is);
    - ``"shorter_crop"`` with a centre crop: resize the shorter side and crop a square of that
      side, leaving the final crop to the model. Two centre crops compose exactly when the
      margin of the second is even; otherwise there is no early resize.
    """
    if preprocess.resize == "squash" or preprocess.crop_pct == 1.0:
        return preprocess.resize_image
    short = round(preprocess.size / preprocess.crop_pct)
    if (short - preprocess.size) % 2:
        return None
    return replace(preprocess, size=short, crop_pct=1.0).resize_image


def draft_size_for(preprocess: Preprocess) -> int:
    """Smallest image side the model's resize needs: JPEGs may be DCT-scaled down to it."""
    return round(preprocess.size / preprocess.crop_pct) if preprocess.resize == "shorter_crop" else preprocess.size


def decode_batches(
    items: Iterable[ImageSource | SkippedFile],
    preprocess: Preprocess,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    draft: bool = True,
    prefetch: int = 2,
) -> Iterator[DecodedBatch]:
    """Decode ``items`` in a thread pool, ``batch_size`` at a time, in order.

    Args:
        items: output of :func:`~hematoscope.predict.sources.expand_paths` (any iterable; it is
            consumed lazily).
        preprocess: the model's input spec; images are resized to its size in the workers when
            that is safe (see :func:`worker_resizer`).
        batch_size: items per batch (skipped items count towards it).
        workers: decode threads (default: one per CPU).
        draft: allow JPEG DCT scaling down to the model's input size (much faster decoding of
            large files; pixels differ slightly from a full decode followed by the resize).
        prefetch: batches decoded ahead of the one being consumed.

    Yields:
        :class:`DecodedBatch` objects, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    from concurrent.futures import ThreadPoolExecutor

    resize = worker_resizer(preprocess)
    draft_size = draft_size_for(preprocess) if draft else None
    archives = ArchiveReader()
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="hematoscope-decode")

    def decode(item: ImageSource | SkippedFile) -> np.ndarray | SkippedFile:
        if isinstance(item, SkippedFile):
            return item
        try:
            data: Path | bytes = item.path if item.member is None else archives.read(item)
            image = load_image(data, draft_size=draft_size)
            return resize(image) if resize else image
        except ImageError as exc:
            return SkippedFile(item.name, exc.reason)
        except (UnsafeArchiveError, zipfile.BadZipFile, zlib.error, OSError) as exc:
            return SkippedFile(item.name, f"cannot read from archive ({exc})")

    def collect(chunk: list, futures: list) -> DecodedBatch:
        batch = DecodedBatch([], [])
        for item, fut in zip(chunk, futures):
            result = fut.result()
            if isinstance(result, SkippedFile):
                batch.skipped.append(result)
            else:
                batch.images.append(result)
                batch.sources.append(item.name)
        return batch

    iterator = iter(items)
    pending: deque[tuple[list, list]] = deque()
    try:
        while True:
            chunk = list(islice(iterator, batch_size))
            if chunk:
                pending.append((chunk, [pool.submit(decode, it) for it in chunk]))
            if pending and (not chunk or len(pending) > prefetch):
                yield collect(*pending.popleft())
            elif not chunk:
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        archives.close()


def predict_sources(
    bundle: "Bundle",
    items: Iterable[ImageSource | SkippedFile],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    draft: bool = True,
) -> Iterator[Prediction]:
    """Classify expanded sources batch by batch (see :func:`iter_predictions`)."""
    for batch in decode_batches(items, bundle.preprocess, batch_size=batch_size, workers=workers, draft=draft):
        pred = bundle.predict_arrays(batch.images, batch.sources)
        pred.skipped = list(batch.skipped)
        yield pred


def iter_predictions(
    bundle: "Bundle",
    paths: Iterable[str | Path],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    draft: bool = True,
) -> Iterator[Prediction]:
    """Classify files, folders, globs and zips, yielding one :class:`Prediction` per batch.

    Memory stays flat however many images there are: use this for very large folders and
    write each batch out as it comes.

    Args:
        bundle: any loaded bundle.
        paths: files, folders, glob patterns or zip files (see
            :func:`~hematoscope.predict.sources.expand_paths`).
        batch_size: images per model call.
        workers: decode threads (default: one per CPU).
        draft: allow JPEG DCT scaling when the model input is much smaller than the file.

    Yields:
        Per batch, a Prediction whose ``skipped`` lists the unreadable files of that batch
        (and inputs with nothing to classify: an empty folder, a hostile or broken zip).
    """
    yield from predict_sources(bundle, expand_paths(paths), batch_size=batch_size, workers=workers, draft=draft)


def predict_paths(
    bundle: "Bundle",
    paths: Iterable[str | Path],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    draft: bool = True,
) -> Prediction:
    """Classify files, folders, globs and zips into one :class:`Prediction` (results in input
    order; unreadable files in ``Prediction.skipped``). Arguments as :func:`iter_predictions`."""
    parts = list(iter_predictions(bundle, paths, batch_size=batch_size, workers=workers, draft=draft))
    return Prediction.concat(parts, bundle.labels)
