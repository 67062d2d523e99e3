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
import threading
import zipfile
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from hematoscope.data.archive import UnsafeArchiveError
from hematoscope.data.images import ImageError, image_size, load_model_image, model_min_side, too_small
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


#: Pixels the decode threads may hold at once (full-size decodes, before the resize to the model's
#: input): two of the largest images :func:`~hematoscope.data.images.load_image` accepts. A
#: folder of large flat scans would otherwise decode one per thread (eight 62-MP PNGs on 8 threads
#: peaked at 5.6 GB); a cell crop is some thousandths of this, so crops decode on every thread.
DECODE_BUDGET_PIXELS = 128_000_000


class PixelBudget:
    """Decoded pixels that threads may hold at once: each reserves an image's pixels before
    decoding it and gives them back when done; a reservation that does not fit waits."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"pixel budget must be positive, got {capacity}")
        self.capacity = capacity
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the block, waiting until they are free (a request
        above the whole budget holds all of it)."""
        pixels = min(int(pixels), self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self._used + pixels <= self.capacity)
            self._used += pixels
        try:
            yield
        finally:
            with self._cond:
                self._used -= pixels
                self._cond.notify_all()


def _header_pixels(data: "bytes | os.PathLike | str") -> int:
    """Pixels an encoded image will decode to, from its header (0 when it has none: its decode
    then fails with the reason, holding nothing)."""
    try:
        w, h = image_size(data)
    except ImageError:
        return 0
    return w * h


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
    budget = PixelBudget(DECODE_BUDGET_PIXELS)
    floor = model_min_side(preprocess)
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="hematoscope-decode")

    def decode(item: ImageSource | SkippedFile) -> np.ndarray | SkippedFile:
        if isinstance(item, SkippedFile):
            return item
        if isinstance(item.data, np.ndarray):  # decoded by the caller: the same size rule as files
            if min(item.data.shape[:2]) < floor:
                return SkippedFile(item.name, too_small(item.data.shape, floor))
            return item.data
        try:
            data = item.data if item.data is not None else item.path if item.member is None else archives.read(item)
            with budget.reserve(_header_pixels(data)):
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
