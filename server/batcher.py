"""Dynamic batching of inference work, one batcher per tower.

Items are queued, not requests: a request of three images puts three items in the queue and
awaits three results, which may be served by different batches. A batch closes when it holds
`max_batch_size` items or when its oldest item has waited `max_wait_ms`, whichever comes
first; while every worker is busy, items accumulate, so batches grow with load by themselves.
The wait is adaptive: after a batch of one item (no load), the next batch closes as soon as
the queue is empty, so a lone query pays no batching delay; any batch of two or more turns
the wait back on.

Interactive items (search, encode) are taken before bulk items (ingest); a bulk item that has
waited `bulk_max_wait_ms` is taken like an interactive one, so bulk work is never starved.
Items whose caller went away (cancelled future) or whose deadline passed are dropped before
inference. An exception from a batch fails exactly that batch's items, and every future is
resolved on every path, including shutdown.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from clipsearch.server.errors import (
    ClipsearchError,
    DeadlineExceeded,
    InferenceError,
    Overloaded,
    Unavailable,
)

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class Priority(enum.IntEnum):
    INTERACTIVE = 0
    BULK = 1


@dataclass(frozen=True)
class ItemTiming:
    queue_us: int
    inference_us: int
    batch_size: int


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    value: R
    timing: ItemTiming


@dataclass(eq=False)
class _Item(Generic[P, R]):
    payload: P
    future: asyncio.Future[BatchResult[R]]
    enqueued_at: float
    deadline: float | None
    priority: Priority = field(default=Priority.INTERACTIVE)


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    dropped_cancelled: int = 0
    dropped_expired: int = 0
    failed_batches: int = 0
    rejected_overload: int = 0


class Batcher(Generic[P, R]):
    """Collects items into batches and runs `run_batch` on them in worker threads.

    `run_batch(payloads)` must return one result per payload, in order. It runs in a thread:
    ONNX Runtime releases the GIL, so the event loop keeps accepting work meanwhile.
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[P]], Sequence[R]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 4096,
        workers: int = 1,
        bulk_max_wait_ms: float = 500.0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or workers < 1:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._run_batch = run_batch
        self._max_wait = max_wait_ms / 1000.0
        self._bulk_max_wait = bulk_max_wait_ms / 1000.0
        self._queues: tuple[deque[_Item[P, R]], deque[_Item[P, R]]] = (deque(), deque())
        self._workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"infer-{name}")
        self._slots: asyncio.Semaphore | None = None
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        # Until a batch of one shows there is no load, assume there is and wait for company.
        self._last_batch_size = max_batch_size

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._slots = asyncio.Semaphore(self._workers)
        self._arrived = asyncio.Event()
        self._loop_task = asyncio.create_task(self._collect_loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop taking work, let running batches finish, fail what is still queued."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._fail_queued(Unavailable(f"{self.name} batcher is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])

    # --- submitting ----------------------------------------------------------------------

    async def submit(
        self,
        payloads: Sequence[P],
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
    ) -> list[BatchResult[R]]:
        """Queue `payloads` and wait for their results, in order.

        `deadline` is a `time.monotonic()` instant; items still queued then are dropped with
        DeadlineExceeded. Cancelling the awaiting task drops its queued items.
        """
        if self._closed or self._arrived is None:
            raise Unavailable(f"{self.name} batcher is not running")
        if not payloads:
            return []
        if self.queued + len(payloads) > self.max_queue:
            self.stats.rejected_overload += 1
            raise Overloaded(
                f"{self.name} queue is full ({self.queued} of {self.max_queue} items queued); "
                "retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [
            _Item[P, R](payload, loop.create_future(), now, deadline, priority)
            for payload in payloads
        ]
        self._queues[priority].extend(items)
        self._arrived.set()
        try:
            if len(items) == 1:  # most interactive calls: no gather future and callbacks
                return [await items[0].future]
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            # One item failed or the caller was cancelled: the rest are of no use to anyone.
            for item in items:
                item.future.cancel()
            raise

    # --- the batching loop ---------------------------------------------------------------

    async def _collect_loop(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect_batch()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception:  # a bug here must not leave futures hanging
                log.exception("%s batcher: collecting a batch failed", self.name)
                self._slots.release()
                self._fail_queued(InferenceError(f"{self.name} batcher failed internally"))
                continue
            self._last_batch_size = len(batch)
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect_batch(self) -> list[_Item[P, R]]:
        assert self._arrived is not None
        batch: list[_Item[P, R]] = []
        close_at: float | None = None
        yielded = False
        while len(batch) < self.max_batch_size:
            item = self._pop_live()
            if item is not None:
                batch.append(item)
                if close_at is None:
                    wait = self._max_wait if self._last_batch_size > 1 else 0.0
                    close_at = item.enqueued_at + wait
                continue
            self._arrived.clear()
            if close_at is None:
                await self._arrived.wait()
                continue
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                if yielded:
                    break
                # Let tasks that are ready to submit (same moment) join before closing.
                yielded = True
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return batch

    def _pop_live(self) -> _Item[P, R] | None:
        """The next item to serve, skipping cancelled and expired ones."""
        interactive, bulk = self._queues
        now = time.monotonic()
        while interactive or bulk:
            starving = bulk and now - bulk[0].enqueued_at >= self._bulk_max_wait
            queue = bulk if (starving or not interactive) else interactive
            item = queue.popleft()
            if item.future.done():
                self.stats.dropped_cancelled += 1
                continue
            if item.deadline is not None and now >= item.deadline:
                self.stats.dropped_expired += 1
                item.future.set_exception(
                    DeadlineExceeded(f"deadline passed while queued for {self.name} inference")
                )
                continue
            return item
        return None

    async def _run(self, batch: list[_Item[P, R]]) -> None:
        assert self._slots is not None
        try:
            now = time.monotonic()
            live = []
            for item in batch:  # the caller may have gone while the batch was forming
                if item.future.done():
                    self.stats.dropped_cancelled += 1
                elif item.deadline is not None and now >= item.deadline:
                    self.stats.dropped_expired += 1
                    item.future.set_exception(DeadlineExceeded("deadline passed before inference"))
                else:
                    live.append(item)
            if not live:
                return
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [item.payload for item in live]
                )
                if len(results) != len(live):
                    raise InferenceError(
                        f"{self.name}: batch of {len(live)} gave {len(results)} results"
                    )
            except BaseException as exc:
                self.stats.failed_batches += 1
                error = (
                    exc
                    if isinstance(exc, ClipsearchError)
                    else InferenceError(
                        f"{self.name} inference failed: {type(exc).__name__}: {exc}"
                    )
                )
                if not isinstance(exc, ClipsearchError | asyncio.CancelledError):
                    log.error("%s batch of %d failed", self.name, len(live), exc_info=exc)
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            inference_us = int((time.monotonic() - started) * 1e6)
            self.stats.batches += 1
            self.stats.items += len(live)
            for item, value in zip(live, results, strict=True):
                if not item.future.done():
                    timing = ItemTiming(
                        queue_us=int((started - item.enqueued_at) * 1e6),
                        inference_us=inference_us,
                        batch_size=len(live),
                    )
                    item.future.set_result(BatchResult(value, timing))
        finally:
            self._slots.release()

    def _fail_queued(self, error: ClipsearchError) -> None:
        for queue in self._queues:
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(error)
