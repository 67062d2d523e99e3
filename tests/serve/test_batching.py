"""The server's model batcher: concurrent requests share model calls, every request is answered
exactly once with its own images in its own order, and a full queue is refused with 503."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hematoscope.bundle.prediction import Prediction
from hematoscope.serve.batching import ModelBatcher, Overloaded

LABELS = [f"c{i}" for i in range(100)]


class IdBundle:
    """Answers each image with the class given by its first pixel, and records the batches it saw."""

    labels = LABELS

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.gate, self.fail_on = gate, fail_on

    def predict_arrays(self, images, sources):
        if self.gate is not None:
            self.gate.wait(10)
        ids = [int(im[0, 0, 0]) for im in images]
        self.batches.append(ids)
        if self.fail_on is not None and self.fail_on in ids:
            raise RuntimeError("model failed")
        n = len(ids)
        probs = np.zeros((n, len(LABELS)))
        probs[np.arange(n), ids] = 1.0
        return Prediction(LABELS, probs, list(sources), np.zeros(n), np.zeros(n, bool), np.zeros(n, bool),
                          [None] * n)


def _image(i: int) -> np.ndarray:
    return np.full((4, 4, 3), i, np.uint8)


def _jobs(sizes: list[int]) -> list[list[int]]:
    ids, jobs = iter(range(1000)), []
    for n in sizes:
        jobs.append([next(ids) for _ in range(n)])
    return jobs


async def _burst(batcher: ModelBatcher, jobs: list[list[int]]):
    return await asyncio.gather(*[batcher.predict([_image(i) for i in job], [f"job{j}/{i}" for i in job])
                                  for j, job in enumerate(jobs)], return_exceptions=True)


def test_a_burst_is_one_model_call_and_each_request_gets_its_own_rows_in_order():
    bundle = IdBundle()
    jobs = _jobs([1, 3, 2, 1, 1, 2, 3, 1, 1, 2, 1, 1, 1, 2, 1, 3, 1, 1, 1, 2])

    async def main():
        batcher = ModelBatcher(bundle, max_batch=64, max_wait_s=0.05)
        await batcher.start()
        try:
            return await _burst(batcher, jobs), batcher.stats
        finally:
            await batcher.stop()

    results, stats = asyncio.run(main())
    total = sum(map(len, jobs))
    assert bundle.batches == [[i for job in jobs for i in job]]  # one model call for the whole burst
    for j, (job, pred) in enumerate(zip(jobs, results)):
        assert pred.predicted == [f"c{i}" for i in job]
        assert pred.sources == [f"job{j}/{i}" for i in job]
    assert (stats.batches, stats.jobs, stats.images, stats.largest_batch) == (1, len(jobs), total, total)


def test_batches_respect_max_batch_and_answer_every_request_once():
    bundle = IdBundle()
    jobs = _jobs([2] * 9 + [7])  # the 7-image job is larger than a batch: it runs whole, alone

    async def main():
        batcher = ModelBatcher(bundle, max_batch=5, max_wait_s=0.01)
        try:
            return await _burst(batcher, jobs)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert [p.predicted for p in results] == [[f"c{i}" for i in job] for job in jobs]
    seen = [i for batch in bundle.batches for i in batch]
    assert sorted(seen) == sorted(i for job in jobs for i in job)  # every image exactly once
    assert all(len(b) <= 5 for b in bundle.batches[:-1]) and bundle.batches[-1] == jobs[-1]
    # requests are never split across model calls
    for job in jobs:
        assert any(b[b.index(job[0]):b.index(job[0]) + len(job)] == job for b in bundle.batches if job[0] in b)


def test_full_queue_is_refused_with_a_retry_time_and_drains_afterwards():
    gate = threading.Event()
    bundle = IdBundle(gate=gate)

    async def main():
        batcher = ModelBatcher(bundle, max_batch=2, max_wait_s=0.0, max_queue=4)
        first = asyncio.ensure_future(batcher.predict([_image(0), _image(1)], ["a", "b"]))
        await asyncio.sleep(0.05)  # the model is now busy with the first job (blocked on the gate)
        waiting = [asyncio.ensure_future(batcher.predict([_image(10 + i)], [str(i)])) for i in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.predict([_image(50)], ["too many"])
        gate.set()
        done = await asyncio.gather(first, *waiting)
        stats = batcher.stats
        await batcher.stop()
        return refused.value, done, stats

    refused, done, stats = asyncio.run(main())
    assert refused.retry_after >= 1 and "queue is full" in str(refused)
    assert [p.predicted for p in done] == [["c0", "c1"], ["c10"], ["c11"], ["c12"], ["c13"]]
    assert stats.refused == 1 and stats.jobs == 5


def test_a_failed_model_call_fails_its_requests_only():
    bundle = IdBundle(fail_on=1)

    async def main():
        batcher = ModelBatcher(bundle, max_batch=64, max_wait_s=0.01)
        try:
            first = await _burst(batcher, [[0], [1]])
            second = await batcher.predict([_image(7)], ["later"])
            return first, second
        finally:
            await batcher.stop()

    first, second = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert second.predicted == ["c7"]


def _files(*named):
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def test_concurrent_api_requests_share_model_calls_and_keep_their_order(make_client, sample_files, tiny_neural_bundle):
    from hematoscope import load_bundle

    client = make_client(batch_wait_ms=50, max_concurrent=32)
    datas = [p.read_bytes() for p in sample_files]
    expected = load_bundle(tiny_neural_bundle).predict(sample_files)
    requests = [[(j + k) % len(datas) for k in range(1 + j % 3)] for j in range(24)]

    def post(j):
        return client.post("/api/predict", files=_files(*[(f"r{j}_{k}_{i}.jpg", datas[i])
                                                          for k, i in enumerate(requests[j])]))

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(post, range(len(requests))))
    assert [r.status_code for r in responses] == [200] * len(requests)
    for j, r in enumerate(responses):
        items = r.json()["items"]
        assert [it["source"] for it in items] == [f"r{j}_{k}_{i}.jpg" for k, i in enumerate(requests[j])]
        for it, i in zip(items, requests[j]):
            assert it["prediction"] == expected.predicted[i]
            assert it["confidence"] == pytest.approx(float(expected.probs[i].max()), abs=1e-5)
    batcher = next(iter(client.app.state.models.values())).batcher
    assert batcher.stats.jobs == len(requests)
    assert batcher.stats.images == sum(map(len, requests))
    assert batcher.stats.batches < len(requests)  # requests were gathered into shared model calls


def test_overloaded_model_queue_is_503_with_retry_after(make_client, sample_files):
    client = make_client()
    batcher = next(iter(client.app.state.models.values())).batcher

    async def refuse(images, sources, ood_accept=None):
        raise Overloaded("the model queue is full (9 images waiting, limit 8); try again shortly", 3)

    batcher.predict = refuse
    r = client.post("/api/predict", files=_files(("a.jpg", sample_files[0].read_bytes())))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "3" and "queue is full" in r.json()["detail"]
    assert client.get("/api/health").json()["analyses"] == 0


def test_a_retired_batcher_refuses_instead_of_starting_again():
    async def run():
        batcher = ModelBatcher(IdBundle())
        await batcher.start()
        assert (await batcher.predict([_image(3)], ["a"])).predicted == ["c3"]
        await batcher.retire()
        with pytest.raises(Overloaded, match="no longer served"):
            await batcher.predict([_image(4)], ["b"])
        assert batcher._task is None  # not started again for a model that is gone

    asyncio.run(run())


def _model_threads() -> int:
    return sum(t.name.startswith("hematoscope-model") for t in threading.enumerate())


def test_removing_a_model_answers_every_request_queued_gathered_or_running():
    """DELETE /api/models/NAME while requests wait for it: none may hang (each holds a worker
    thread and a concurrency slot); each is answered, a failure saying the model was removed."""
    gate = threading.Event()
    threads_before = _model_threads()

    async def main():
        busy = ModelBatcher(IdBundle(gate=gate), max_batch=4, max_wait_s=0.0)
        gathering = ModelBatcher(IdBundle(), max_batch=4, max_wait_s=5.0)
        running = asyncio.ensure_future(busy.predict([_image(i) for i in range(4)], list("abcd")))  # a full batch
        await asyncio.sleep(0.05)  # now in the model (blocked on the gate)
        queued = [asyncio.ensure_future(busy.predict([_image(10 + i)], [str(i)])) for i in range(3)]
        # taken from the queue by the batching task, waiting (up to 5 s) for others to join it
        gathered = asyncio.ensure_future(gathering.predict([_image(20)], ["g"]))
        await asyncio.sleep(0.05)
        threading.Timer(0.1, gate.set).start()  # the running model call ends while the model is removed
        await asyncio.wait_for(asyncio.gather(busy.retire(), gathering.retire()), 5)
        callers = [running, *queued, gathered]
        done, pending = await asyncio.wait(callers, timeout=0.5)
        for f in pending:
            f.cancel()
        return [f.exception() if f.done() and not f.cancelled() else f for f in callers], pending, busy, gathering

    outcomes, pending, busy, gathering = asyncio.run(main())
    gate.set()
    assert not pending, f"{len(pending)} of {len(outcomes)} requests were never answered"
    for outcome in outcomes:  # all failed: the one in the model too (its result came after the removal)
        assert isinstance(outcome, Overloaded) and "removed" in str(outcome) and "shutting down" not in str(outcome)
    assert not busy._futures and not gathering._futures and busy.queued_images == 0
    assert _model_threads() == threads_before  # the model threads ended


def test_stopping_the_server_fails_waiting_requests_saying_so():
    gate = threading.Event()

    async def main():
        batcher = ModelBatcher(IdBundle(gate=gate), max_batch=1, max_wait_s=0.0)
        calls = [asyncio.ensure_future(batcher.predict([_image(i)], [str(i)])) for i in range(3)]
        await asyncio.sleep(0.05)
        threading.Timer(0.1, gate.set).start()
        await asyncio.wait_for(batcher.stop(), 5)
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 0.5)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, Overloaded) and "shutting down" in str(o) for o in outcomes)
