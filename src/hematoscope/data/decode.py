"""The one decode loop: images decoded in worker threads while the caller runs the model.

A pool of threads reads and decodes images with
:func:`hematoscope.data.images.load_model_image` (the one decoding every path uses: JPEG DCT
scaling down to the model's size, then the resize that leaves the model input unchanged); the
calling thread runs the model on one batch while the next batches decode.
Pillow and ONNX Runtime / torch release the GIL for their heavy work, so threads overlap well.
At most ``prefetch + 1`` batches are in flight, so memory stays flat however many images there
are. Batches come back in input order; unreadable files become
:class:`~hematoscope.data.sources.SkippedFile` records and the run goes on.

Every path that runs a model over images goes through :func:`decode_batches`, most of them
through :meth:`hematoscope.bundle.Bundle.iter_batches`: prediction (library, CLI, server
uploads), trust fitting, evaluation, feature extraction for few-shot heads and ONNX export checks.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from hematoscope.data.archive import UnsafeArchiveError
from hematoscope.data.images import MIN_MODEL_SIDE, ImageError, load_model_image, too_small
from hematoscope.data.sources import ArchiveReader, ImageSource, SkippedFile

if TYPE_CHECKING:
    from hematoscope.models.preprocess import Preprocess


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


def decode_batches(
    items: Iterable[ImageSource | SkippedFile],
    preprocess: Preprocess,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    prefetch: int = 2,
) -> Iterator[DecodedBatch]:
    """Decode ``items`` in a thread pool, ``batch_size`` at a time, in order.

    Args:
        items: output of :func:`~hematoscope.data.sources.expand_paths` (any iterable; it is
            consumed lazily).
        preprocess: the model's input spec (decoded with :func:`load_model_image`).
        batch_size: items per batch (skipped items count towards it).
        workers: decode threads (default: one per CPU).
        prefetch: batches decoded ahead of the one being consumed.

    Yields:
        :class:`DecodedBatch` objects, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    from concurrent.futures import ThreadPoolExecutor

    archives = ArchiveReader()
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="hematoscope-decode")

    def decode(item: ImageSource | SkippedFile) -> np.ndarray | SkippedFile:
        if isinstance(item, SkippedFile):
            return item
        if isinstance(item.data, np.ndarray):  # decoded by the caller: the same size rule as files
            if min(item.data.shape[:2]) < MIN_MODEL_SIDE:
                return SkippedFile(item.name, too_small(item.data.shape))
            return item.data
        try:
            data = item.data if item.data is not None else item.path if item.member is None else archives.read(item)
            return load_model_image(data, preprocess)
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
