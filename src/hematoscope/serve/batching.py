"""Gather the images of concurrent requests into model batches.

Each request used to run its own forward pass: with 50 clients sending one image each, the
model ran 50 batches of 1. :class:`ModelBatcher` puts every request's decoded images on one
asyncio queue; a single task takes what has arrived (waiting at most ``max_wait_s`` after the
first job for more, up to ``max_batch`` images), runs ``bundle.predict_arrays`` once on all of
them in its own model thread (once per operating point of the OOD flag the requests chose), and
hands each request its own rows back, in its own order.

The queue is bounded by images: a job that would take it past ``max_queue`` images is refused at
once with :class:`Overloaded` (the API answers 503 with ``Retry-After``), so a burst cannot
pile up unbounded memory and latency.
"""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


#: why a removed model's requests fail (:meth:`ModelBatcher.retire`)
REMOVED = "this model was removed and is no longer served; choose another"


class Overloaded(RuntimeError):
    """The model queue is full; ``retry_after`` seconds is a fair wait before trying again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


#: A request's ``ood_accept`` meaning the flag as fitted, on a server whose models were moved
#: (``serve --ood-accept``); None means as the model is served.
AS_FITTED = "fitted"


def bundle_at(bundle, ood_accept: float | str | None):
    """``bundle`` with its OOD flag at ``ood_accept`` (None: as served; :data:`AS_FITTED`: as
    fitted; a share: :meth:`Bundle.at_ood_accept`), a twin unless unchanged."""
    if ood_accept is None:
        return bundle
    return bundle.at_ood_accept(None if ood_accept == AS_FITTED else ood_accept)


@dataclass
class _Job:
    images: Sequence[np.ndarray]
    sources: list[str]
    future: asyncio.Future = field(repr=False)
    ood_accept: float | str | None = None


@dataclass
class BatchStats:
    """What the batcher has done so far (for /api/health and the load test)."""

    batches: int = 0
    images: int = 0
    jobs: int = 0
    refused: int = 0
    largest_batch: int = 0
    model_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images, "jobs": self.jobs, "refused": self.refused,
                "largest_batch": self.largest_batch, "model_seconds": round(self.model_seconds, 3),
                "mean_batch": round(self.images / self.batches, 2) if self.batches else None}


class ModelBatcher:
    """One model, many concurrent callers: their images are classified together.

    Args:
        bundle: the loaded bundle (its ``predict_arrays`` is called from one thread only).
        max_batch: most images per model call (a single larger job still runs whole).
        max_wait_s: how long the first job of a batch waits for others to join it.
        max_queue: most images waiting for the model; beyond it jobs are refused.
    """

    def __init__(self, bundle, *, max_batch: int = 64, max_wait_s: float = 0.005, max_queue: int = 512):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.bundle = bundle
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None  # a job that did not fit the last batch: first in the next
        self._queued_images = 0
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._seconds_per_image = 0.01  # running estimate, for Retry-After
        self._retired = False
        #: the future of every job not yet answered, wherever the job is (queue, carry, batch, model)
        self._futures: set[asyncio.Future] = set()
        #: the bundle at each operating point a request chose (``Bundle.at_ood_accept``), made once
        self._at: dict[float, Any] = {}

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the batching task on the running event loop (idempotent)."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hematoscope-model")
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hematoscope-batcher")

    async def stop(self, reason: str = "the server is shutting down", retry_after: int = 5) -> None:
        """Stop the task; every request not yet answered (queued, gathered into a batch or in the
        model) fails at once with Overloaded(``reason``); returns once the model thread is done."""
        if self._task is None:
            return
        task, executor = self._task, self._executor
        task.cancel()
        try:
            await asyncio.wait([task])  # (does not swallow a cancellation of stop() itself)
        finally:  # even if stop() is cancelled: no caller may be left waiting
            for future in self._futures:
                if not future.done():
                    future.set_exception(Overloaded(reason, retry_after))
            self._futures.clear()
            self._task = self._queue = self._executor = self._carry = None
            self._queued_images = 0
        # a model call still running finishes in its thread (its callers have been answered);
        # wait for it off the event loop
        await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)

    async def retire(self) -> None:
        """Stop for good (the model is no longer served): waiting requests, and later calls,
        fail with Overloaded saying the model was removed, instead of starting the task again."""
        self._retired = True
        await self.stop(REMOVED, 1)

    # --- use ---------------------------------------------------------------------------
    @property
    def queued_images(self) -> int:
        return self._queued_images

    async def predict(self, images: Sequence[np.ndarray], sources: Sequence[str],
                      ood_accept: float | str | None = None):
        """Classify ``images`` together with whatever other callers sent meanwhile; with
        ``ood_accept``, at that operating point of the OOD flag (:meth:`Bundle.at_ood_accept`;
        None: the bundle's own).

        Returns:
            A :class:`~hematoscope.bundle.prediction.Prediction` of exactly these images, in order.

        Raises:
            Overloaded: the queue holds too many images already.
            ValueError: ``ood_accept`` is not one of the bundle's ``ood_accept_shares()``.
        """
        from hematoscope.bundle.prediction import Prediction

        if len(images) != len(sources):
            raise ValueError(f"{len(images)} images but {len(sources)} source names")
        if not images:
            return Prediction.empty(self.bundle.labels)
        if self._retired:
            raise Overloaded(REMOVED, 1)
        if self._task is None:
            await self.start()
        if self._queued_images + len(images) > self.max_queue and self._queued_images > 0:
            self.stats.refused += 1
            wait = self._queued_images * self._seconds_per_image
            raise Overloaded(f"the model queue is full ({self._queued_images} images waiting, limit "
                             f"{self.max_queue}); try again shortly", max(1, math.ceil(wait)))
        if ood_accept not in (None, AS_FITTED) and ood_accept not in self.bundle.ood_accept_shares():
            raise ValueError(f"the model's unlike-training flag has no operating point {ood_accept:g}")
        future = asyncio.get_running_loop().create_future()
        self._queued_images += len(images)
        self._queue.put_nowait(_Job(list(images), list(sources), future, ood_accept))
        self._futures.add(future)
        try:
            return await future
        finally:
            self._futures.discard(future)

    def _predict_at(self, ood_accept: float | None, images: list[np.ndarray], sources: list[str]):
        """The model call, in the model thread (which alone makes and uses the copies)."""
        return self._bundle_at(ood_accept).predict_arrays(images, sources)

    def _bundle_at(self, ood_accept: float | None):
        if ood_accept is None:
            return self.bundle
        if ood_accept not in self._at:
            self._at[ood_accept] = bundle_at(self.bundle, ood_accept)
        return self._at[ood_accept]

    async def _gather(self) -> list[_Job]:
        """The next batch: the first waiting job, then those arriving within the wait window."""
        if self._carry is not None:
            jobs, self._carry = [self._carry], None
        else:
            jobs = [await self._queue.get()]
        n = len(jobs[0].images)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            if not self._queue.empty():
                job = self._queue.get_nowait()
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            if n + len(job.images) > self.max_batch:
                self._carry = job  # first in the next batch
                break
            jobs.append(job)
            n += len(job.images)
        return jobs

    async def _run(self) -> None:
        while True:
            gathered = await self._gather()
            self._queued_images -= sum(len(j.images) for j in gathered)  # no longer waiting
            jobs = [j for j in gathered if not j.future.cancelled()]  # callers gone: skip their images
            for point in dict.fromkeys(j.ood_accept for j in jobs):  # one model call per operating point
                await self._answer([j for j in jobs if j.ood_accept == point], point)

    async def _answer(self, jobs: list[_Job], ood_accept: float | None) -> None:
        """One model call for ``jobs`` (of one operating point); each caller gets its rows."""
        images = [im for j in jobs for im in j.images]
        sources = [s for j in jobs for s in j.sources]
        n = len(images)
        if n == 0:
            return
        start = time.perf_counter()
        try:
            pred = await asyncio.get_running_loop().run_in_executor(self._executor, self._predict_at, ood_accept,
                                                                    images, sources)
        except Exception as exc:  # the callers get the error; the batcher goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            offset = 0
            for job in jobs:
                part = pred.take(np.arange(offset, offset + len(job.images)))
                offset += len(job.images)
                if not job.future.done():
                    job.future.set_result(part)
        finally:
            seconds = time.perf_counter() - start
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / n
            s = self.stats
            s.batches, s.images, s.jobs = s.batches + 1, s.images + n, s.jobs + len(jobs)
            s.largest_batch, s.model_seconds = max(s.largest_batch, n), s.model_seconds + seconds


async def start_batcher(served_model, settings) -> None:
    """Give a served model (:class:`~hematoscope.serve.deps.ServedModel`) the batching thread
    that runs it for every request, sized by the server's ``settings``."""
    served_model.batcher = ModelBatcher(served_model.bundle, max_batch=settings.batch_size,
                                        max_wait_s=settings.batch_wait_ms / 1000,
                                        max_queue=settings.max_queued_images)
    await served_model.batcher.start()
