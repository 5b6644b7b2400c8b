"""Batcher semantics, with a recording fake in place of a model."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest

from clipsearch.server.batcher import Batcher, Priority
from clipsearch.server.errors import DeadlineExceeded, InferenceError, Overloaded, Unavailable
from clipsearch.server.fake import FakeBackend


class Recorder:
    """run_batch that squares numbers, records every batch, and can be held at a gate."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, payloads: list[int]) -> Sequence[int]:
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        self.batches.append(list(payloads))
        if self.fail_on is not None and self.fail_on in payloads:
            raise ValueError("bad item in batch")
        return [p * p for p in payloads]

    @property
    def seen(self) -> list[int]:
        return [p for batch in self.batches for p in batch]


async def started(run: Callable[[list[int]], Sequence[int]], **kwargs: object) -> Batcher[int, int]:
    batcher: Batcher[int, int] = Batcher("test", run, **kwargs)  # type: ignore[arg-type]
    await batcher.start()
    return batcher


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.gate.set()


async def hold_worker(batcher: Batcher[int, int], rec: Recorder) -> asyncio.Task[object]:
    """Occupy the single worker with item -1 until rec.gate is set."""
    rec.gate.clear()
    rec.entered.clear()
    blocker = asyncio.create_task(batcher.submit([-1]))
    await asyncio.to_thread(rec.entered.wait, 5)
    return blocker  # type: ignore[return-value]


async def test_batch_closes_at_max_size(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=4, max_wait_ms=5_000)
    t0 = time.monotonic()
    results = await asyncio.wait_for(b.submit(list(range(8))), 2)
    assert time.monotonic() - t0 < 2.0  # far less than max_wait: size closed the batches
    assert [r.value for r in results] == [i * i for i in range(8)]
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [r.timing.batch_size for r in results] == [4] * 8
    await b.close()


async def test_batch_closes_after_max_wait(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=32, max_wait_ms=80)
    t0 = time.monotonic()
    first = asyncio.create_task(b.submit([1]))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(b.submit([2, 3]))
    await asyncio.wait_for(asyncio.gather(first, second), 2)
    elapsed = time.monotonic() - t0
    assert recorder.batches == [[1, 2, 3]]  # the later items joined the open batch
    assert 0.075 <= elapsed < 1.0
    await b.close()


async def test_lone_items_skip_the_wait_until_load_returns(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=32, max_wait_ms=300)
    await b.submit([1])  # the first batch waits (load unknown) and holds one item
    t0 = time.monotonic()
    await asyncio.wait_for(b.submit([2]), 2)
    assert time.monotonic() - t0 < 0.2  # after a batch of one: no waiting
    # Two at once form a batch of two, after which the wait is back on.
    await asyncio.wait_for(asyncio.gather(b.submit([3]), b.submit([4])), 2)
    t0 = time.monotonic()
    first = asyncio.create_task(b.submit([5]))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(b.submit([6]))
    await asyncio.wait_for(asyncio.gather(first, second), 2)
    assert time.monotonic() - t0 >= 0.25
    assert recorder.batches == [[1], [2], [3, 4], [5, 6]]
    await b.close()


async def test_results_follow_request_order_across_batches() -> None:
    rec = Recorder()
    b = await started(rec, max_batch_size=3, max_wait_ms=1)
    results = await b.submit([5, 1, 4, 2, 3, 9, 7])
    assert [r.value for r in results] == [25, 1, 16, 4, 9, 81, 49]
    assert max(len(x) for x in rec.batches) <= 3
    await b.close()


async def test_interactive_items_go_before_bulk(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=2, max_wait_ms=1, bulk_max_wait_ms=60_000)
    blocker = await hold_worker(b, recorder)
    bulk = asyncio.create_task(b.submit([100, 101, 102, 103], Priority.BULK))
    await asyncio.sleep(0.01)
    interactive = asyncio.create_task(b.submit([1, 2, 3], Priority.INTERACTIVE))
    await asyncio.sleep(0.01)
    recorder.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, bulk, interactive), 5)
    assert recorder.batches == [[-1], [1, 2], [3, 100], [101, 102], [103]]
    await b.close()


async def test_without_priority_items_are_served_in_arrival_order(recorder: Recorder) -> None:
    b = await started(
        recorder, max_batch_size=2, max_wait_ms=1, bulk_max_wait_ms=60_000, prioritize=False
    )
    blocker = await hold_worker(b, recorder)
    bulk = asyncio.create_task(b.submit([100, 101, 102], Priority.BULK))
    await asyncio.sleep(0.01)
    interactive = asyncio.create_task(b.submit([1, 2, 3], Priority.INTERACTIVE))
    await asyncio.sleep(0.01)
    recorder.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, bulk, interactive), 5)
    assert recorder.batches == [[-1], [100, 101], [102, 1], [2, 3]]
    await b.close()


async def test_bulk_is_not_starved(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=1, max_wait_ms=0, bulk_max_wait_ms=50)
    blocker = await hold_worker(b, recorder)
    bulk = asyncio.create_task(b.submit([100], Priority.BULK))
    await asyncio.sleep(0.01)
    flood = asyncio.create_task(b.submit(list(range(1, 41)), Priority.INTERACTIVE))
    await asyncio.sleep(0.08)  # the bulk item is now older than bulk_max_wait
    recorder.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, bulk, flood), 5)
    # Without aging, 100 would come after all 40 interactive items.
    assert recorder.seen.index(100) == 1
    await b.close()


async def test_cancelled_items_are_dropped_before_inference(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=8, max_wait_ms=1)
    blocker = await hold_worker(b, recorder)
    doomed = asyncio.create_task(b.submit([7, 8]))
    kept = asyncio.create_task(b.submit([9]))
    await asyncio.sleep(0.01)
    doomed.cancel()
    recorder.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, kept), 5)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert 7 not in recorder.seen and 8 not in recorder.seen
    assert 9 in recorder.seen
    assert b.stats.dropped_cancelled == 2
    await b.close()


async def test_expired_items_are_dropped_with_deadline_exceeded(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=8, max_wait_ms=1)
    blocker = await hold_worker(b, recorder)
    late = asyncio.create_task(b.submit([7], deadline=time.monotonic() + 0.03))
    on_time = asyncio.create_task(b.submit([8], deadline=time.monotonic() + 30))
    await asyncio.sleep(0.1)
    recorder.gate.set()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(late, 5)
    assert (await asyncio.wait_for(on_time, 5))[0].value == 64
    await blocker
    assert 7 not in recorder.seen
    assert b.stats.dropped_expired == 1
    await b.close()


async def test_inference_error_fails_exactly_that_batch() -> None:
    rec = Recorder(fail_on=13)
    b = await started(rec, max_batch_size=2, max_wait_ms=50)
    rec.gate.clear()
    blocker = asyncio.create_task(b.submit([-1]))
    await asyncio.to_thread(rec.entered.wait, 5)
    bad_pair = asyncio.create_task(b.submit([12, 13]))  # one batch of two
    await asyncio.sleep(0.01)
    good_pair = asyncio.create_task(b.submit([14, 15]))  # the next batch
    await asyncio.sleep(0.01)
    rec.gate.set()
    await blocker
    with pytest.raises(InferenceError, match="ValueError: bad item in batch"):
        await asyncio.wait_for(bad_pair, 5)
    assert [r.value for r in await asyncio.wait_for(good_pair, 5)] == [196, 225]
    assert rec.batches[1] == [12, 13]
    assert b.stats.failed_batches == 1
    assert [r.value for r in await b.submit([3])] == [9]  # still serving
    await b.close()


async def test_worker_death_and_lost_pool_fail_futures_instead_of_hanging() -> None:
    def dies(payloads: list[int]) -> Sequence[int]:
        raise SystemExit("worker thread died")

    b = await started(dies, max_batch_size=4, max_wait_ms=1)
    with pytest.raises(InferenceError, match="SystemExit"):
        await asyncio.wait_for(b.submit([1, 2]), 5)

    ok = await started(Recorder(), max_batch_size=4, max_wait_ms=1)
    ok._executor.shutdown()  # the pool is gone: scheduling itself raises
    with pytest.raises(InferenceError, match="RuntimeError"):
        await asyncio.wait_for(ok.submit([1]), 5)
    await b.close()
    await ok.close()


async def test_full_queue_is_rejected_with_overloaded(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=1, max_wait_ms=0, max_queue=4)
    blocker = await hold_worker(b, recorder)
    waiting = asyncio.create_task(b.submit([1, 2, 3]))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="queue is full"):
        await b.submit([4, 5])  # 3 queued + 2 > 4: all-or-nothing
    fits = asyncio.create_task(b.submit([6]))
    await asyncio.sleep(0.01)
    recorder.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, waiting, fits), 5)
    assert 4 not in recorder.seen and 5 not in recorder.seen
    assert b.stats.rejected_overload == 1
    await b.close()


async def test_close_fails_queued_items_and_refuses_new_ones(recorder: Recorder) -> None:
    b = await started(recorder, max_batch_size=1, max_wait_ms=0)
    blocker = await hold_worker(b, recorder)
    queued = asyncio.create_task(b.submit([1, 2]))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(b.close())
    await asyncio.sleep(0.01)
    recorder.gate.set()
    await asyncio.wait_for(closing, 5)
    assert (await blocker)[0].value == 1  # type: ignore[index]
    with pytest.raises(Unavailable):
        await queued
    with pytest.raises(Unavailable):
        await b.submit([3])


async def test_stress_many_tasks_every_result_correct_nothing_leaked() -> None:
    fake = FakeBackend(dim=8)

    def run(payloads: list[np.ndarray]) -> Sequence[np.ndarray]:
        return list(fake.run_vision(np.stack(payloads)))

    b: Batcher[np.ndarray, np.ndarray] = Batcher(
        "stress", run, max_batch_size=16, max_wait_ms=1, max_queue=100_000, workers=2
    )
    await b.start()
    rng = random.Random(0)
    inputs = [np.full((2, 2), i, np.float32) for i in range(3000)]
    expected = fake.run_vision(np.stack(inputs))
    fake.batch_sizes.clear()
    cancelled: set[int] = set()
    submitted = 0

    async def client(start: int, stop: int) -> None:
        nonlocal submitted
        for lo in range(start, stop, 7):
            chunk = list(range(lo, min(lo + rng.randint(1, 7), stop)))
            submitted += len(chunk)
            prio = Priority.BULK if lo % 3 == 0 else Priority.INTERACTIVE
            got = await b.submit([inputs[i] for i in chunk], prio)
            for i, result in zip(chunk, got, strict=True):
                np.testing.assert_array_equal(result.value, expected[i])

    async def canceller(index: int) -> None:
        task = asyncio.create_task(b.submit([inputs[index]]))
        await asyncio.sleep(0)
        task.cancel()
        cancelled.add(index)
        with pytest.raises(asyncio.CancelledError):
            await task

    tasks = [client(lo, lo + 30) for lo in range(0, 3000, 30)]
    tasks += [canceller(i) for i in range(0, 3000, 97)]
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert b.queued == 0
    assert not b._running
    assert b.stats.failed_batches == 0
    assert (
        b.stats.items
        == sum(fake.batch_sizes)
        == submitted + len(cancelled) - (b.stats.dropped_cancelled)
    )
    assert max(fake.batch_sizes) <= 16
    await b.close()


async def test_submit_each_fails_only_the_items_of_the_failed_batch() -> None:
    batches: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        batches.append(items)
        if 3 in items:
            raise RuntimeError("this batch broke")
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher("t", run, max_batch_size=2, max_wait_ms=50.0)
    await batcher.start()
    try:
        results = await batcher.submit_each([1, 2, 3, 4, 5], Priority.BULK)
    finally:
        await batcher.close()
    assert batches == [[1, 2], [3, 4], [5]]
    values = [r if isinstance(r, BaseException) else r.value for r in results]
    assert values[:2] == [10, 20] and values[4] == 50
    assert all(isinstance(v, InferenceError) for v in values[2:4])
    assert [r.timing.batch_size for r in results if not isinstance(r, BaseException)] == [2, 2, 1]
