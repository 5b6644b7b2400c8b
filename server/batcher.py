"""Dynamic batching: `MicroBatcher`, the core, and `Batcher`, inference on one tower.

The core serves inference (one `Batcher` per tower) and group commits (`group_commit`): it
queues items, closes batches and resolves every item's future; what runs a batch is the
subclass's (`_execute`).

Items are queued, not requests: a request of three images puts three items in the queue and
awaits three results, which may be served by different batches. A batch closes when it holds
`max_batch_size` items or when its oldest item has waited `max_wait_ms`, whichever comes
first; while every worker is busy, items accumulate, so batches grow with load by themselves.
The wait is adaptive: after a batch of one item (no load), the next batch closes as soon as
the queue is empty, so a lone query pays no batching delay; any batch of two or more turns
the wait back on.

Interactive items (search, encode) are taken before bulk items (ingest); a bulk item that has
waited `bulk_max_wait_ms` is taken like an interactive one, so bulk work is never starved.
With `prioritize=False` both are served first come, first served (for comparisons).
Items whose caller went away (cancelled future) or whose deadline passed are dropped before
running. An exception from a batch fails exactly that batch's items, and every future is
resolved on every path, including shutdown.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
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

# Told of every batch that ran: its item count and the seconds its run took (for metrics).
BatchHook = Callable[[int, float], None]


def unexpected_error(name: str, exc: BaseException) -> ClipsearchError:
    """A bug's exception as an INTERNAL error for the client: logged here with its traceback
    under a reference; the client's message has the reference, not the details."""
    reference = uuid.uuid4().hex[:12]
    log.error("%s failed (ref %s)", name, reference, exc_info=exc)
    return ClipsearchError(f"{name} failed (ref {reference}); the server log has details")


class Priority(enum.IntEnum):
    INTERACTIVE = 0
    BULK = 1


@dataclass(frozen=True)
class ItemTiming:
    queue_us: int
    run_us: int  # the run of the item's whole batch
    batch_size: int

    @property
    def inference_us(self) -> int:
        """`run_us`, for batches that run inference."""
        return self.run_us


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


class MicroBatcher(Generic[P, R]):
    """Collects items into batches and runs each batch with `_execute`, at most `workers`
    batches at once. `_execute(payloads)` must return one result per payload, in order."""

    def __init__(
        self,
        name: str,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 4096,
        workers: int = 1,
        bulk_max_wait_ms: float = 500.0,
        prioritize: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or workers < 1:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self.on_batch: BatchHook | None = None
        self._prioritize = prioritize
        self._max_wait = max_wait_ms / 1000.0
        self._bulk_max_wait = bulk_max_wait_ms / 1000.0
        self._queues: tuple[deque[_Item[P, R]], deque[_Item[P, R]]] = (deque(), deque())
        self._workers = workers
        self._slots: asyncio.Semaphore | None = None
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        # Until a batch of one shows there is no load, assume there is and wait for company.
        self._last_batch_size = max_batch_size

    async def _execute(self, payloads: list[P]) -> Sequence[R]:
        raise NotImplementedError

    def _failure(self, exc: BaseException) -> ClipsearchError:
        """The error the items of a batch get when `_execute` raised `exc` (no domain error)."""
        if isinstance(exc, asyncio.CancelledError):
            return Unavailable(f"{self.name} stopped before the batch was done")
        return unexpected_error(self.name, exc)

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

    @property
    def queued(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])

    def queued_at(self, priority: Priority) -> int:
        return len(self._queues[priority])

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
        items = self._enqueue(payloads, priority, deadline)
        if not items:
            return []
        try:
            if len(items) == 1:  # most interactive calls: no gather future and callbacks
                return [await items[0].future]
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            # One item failed or the caller was cancelled: the rest are of no use to anyone.
            for item in items:
                item.future.cancel()
            raise

    async def submit_each(
        self,
        payloads: Sequence[P],
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
    ) -> list[BatchResult[R] | BaseException]:
        """Like `submit`, but each payload gets its own result or error: an item whose batch
        failed does not cancel the others (a stream's group of items shares one call)."""
        items = self._enqueue(payloads, priority, deadline)
        if not items:
            return []
        futures = [item.future for item in items]
        try:
            await asyncio.wait(futures)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [f.exception() or f.result() for f in futures]

    def _enqueue(
        self, payloads: Sequence[P], priority: Priority, deadline: float | None
    ) -> list[_Item[P, R]]:
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
        return items

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
                self._fail_queued(ClipsearchError(f"{self.name} batcher failed internally"))
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
            if self._prioritize:
                starving = bulk and now - bulk[0].enqueued_at >= self._bulk_max_wait
            else:  # first come, first served across both queues
                starving = bulk and (
                    not interactive or bulk[0].enqueued_at <= interactive[0].enqueued_at
                )
            queue = bulk if (starving or not interactive) else interactive
            item = queue.popleft()
            if item.future.done():
                self.stats.dropped_cancelled += 1
                continue
            if item.deadline is not None and now >= item.deadline:
                self.stats.dropped_expired += 1
                item.future.set_exception(
                    DeadlineExceeded(f"deadline passed while queued in the {self.name} batcher")
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
                    expired = DeadlineExceeded(f"deadline passed before {self.name} ran")
                    item.future.set_exception(expired)
                else:
                    live.append(item)
            if not live:
                return
            started = time.monotonic()
            try:
                results = await self._execute([item.payload for item in live])
                if len(results) != len(live):
                    raise ClipsearchError(
                        f"{self.name}: batch of {len(live)} gave {len(results)} results"
                    )
            except BaseException as exc:
                self.stats.failed_batches += 1
                error = exc if isinstance(exc, ClipsearchError) else self._failure(exc)
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            run_s = time.monotonic() - started
            run_us = int(run_s * 1e6)
            self.stats.batches += 1
            self.stats.items += len(live)
            for item, value in zip(live, results, strict=True):
                if not item.future.done():
                    timing = ItemTiming(
                        queue_us=int((started - item.enqueued_at) * 1e6),
                        run_us=run_us,
                        batch_size=len(live),
                    )
                    item.future.set_result(BatchResult(value, timing))
            if self.on_batch is not None:
                try:
                    self.on_batch(len(live), run_s)
                except Exception:  # a metrics bug must not fail a batch that succeeded
                    log.exception("%s batcher: the batch hook failed", self.name)
        finally:
            self._slots.release()

    def _fail_queued(self, error: ClipsearchError) -> None:
        for queue in self._queues:
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(error)


class Batcher(MicroBatcher[P, R]):
    """Inference batches: `run_batch(payloads)` runs in the batcher's own worker threads
    (ONNX Runtime releases the GIL, so the event loop keeps accepting work meanwhile) and
    must return one result per payload, in order."""

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
        prioritize: bool = True,
    ) -> None:
        super().__init__(
            name,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            workers=workers,
            bulk_max_wait_ms=bulk_max_wait_ms,
            prioritize=prioritize,
        )
        self._run_batch = run_batch
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"infer-{name}")

    async def _execute(self, payloads: list[P]) -> Sequence[R]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_batch, payloads)

    def _failure(self, exc: BaseException) -> ClipsearchError:
        if not isinstance(exc, asyncio.CancelledError):
            log.error("%s batch failed", self.name, exc_info=exc)
        return InferenceError(f"{self.name} inference failed: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        await super().close()
        self._executor.shutdown(wait=False, cancel_futures=True)
