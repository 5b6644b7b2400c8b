"""Resumable streaming ingest: the state machine both clients drive.

The Ingest RPC is one bidirectional stream: IngestOptions, then items, each answered by one
ack (in completion order, `seq` echoed). `IngestState` keeps everything that must survive a
broken stream, independent of the transport:

- flow control: a driver sends an item only after taking one of `window` slots and gives the
  slot back on its ack, so at most `window` items are sent but unacknowledged, and the
  source is read no faster than the server writes (plus `PREFETCH` items read ahead);
- messages: the items that are ready when a message goes (slots free, items read) travel
  together, up to `MAX_ITEMS_PER_MESSAGE` and `MAX_MESSAGE_BYTES`, so a stream of small
  images does not pay a gRPC message per item on either side; the source is read in a thread
  (or task) of its own, so a message never waits for a slow source while it holds items;
- resume: every item gets a sequence number and stays in `pending` until its ack. When the
  stream breaks (UNAVAILABLE: connection lost, server restarting or draining) the driver
  waits an exponential backoff, opens a new stream, and the new attempt first resends the
  pending items, then goes on with the source. The server upserts by id (or content hash),
  so an item written before the break but not acknowledged is written again, never twice;
- bounds: the resume gives up with the last error once it has waited `backoff.give_up_s`
  (default 120 s: long enough for a server to restart or a store to come back) in broken
  attempts without a single ack, or after `max_attempts` such attempts if that is set; any
  ack resets both, so a long ingest survives occasional restarts;
- local failures: a path item whose file cannot be read, or a manifest row that cannot
  describe an item (the source raises `RowError` and goes on), is reported as a failed
  result and never sent.

The sync and asyncio drivers (`SyncIngestStream`, `AsyncIngestStream`) only add the blocking
primitives (a thread semaphore or an asyncio one) and the way the source is iterated.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import random
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
from tqdm import tqdm

from clipsearch.client.convert import ingest_item, ingest_result
from clipsearch.client.errors import ClipsearchError, Unavailable, from_rpc_error
from clipsearch.client.sources import RowError
from clipsearch.client.types import IngestItem, IngestResult, IngestSummary
from clipsearch.v1 import clipsearch_pb2 as pb

# A broken connection, a restarting or draining server, or a store that is briefly down.
RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# grpc.aio replaces the status of a stream the server ended while a request write was in
# flight with this one (grpc/grpc#36066): seen when the server stops mid-ingest.
AIO_WRITE_AFTER_CLOSE = (grpc.StatusCode.INTERNAL, "Internal error from Core")
SLOT_POLL_S = 0.05
MAX_ITEMS_PER_MESSAGE = 64
# A message is closed before an item would take it past this (one larger item goes alone),
# well under the server's max_message_mb.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
PREFETCH = 64  # source items read ahead of the window's slots


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with +-`jitter` relative randomization between resume attempts,
    for at most `give_up_s` seconds of waiting without progress (0.25 s doubling to 10 s:
    about 17 attempts in the default 120 s)."""

    initial_s: float = 0.25
    maximum_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.2
    give_up_s: float = 120.0

    def delay(self, failures: int) -> float:
        base = min(self.maximum_s, self.initial_s * self.multiplier ** max(0, failures - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def resumable(error: ClipsearchError) -> bool:
    """Whether a broken ingest stream may be resumed after this error."""
    return error.code in RESUMABLE_CODES or (error.code, error.message) == AIO_WRITE_AFTER_CLOSE


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...
    def close(self) -> Any: ...


def progress_bar(total: int | None, description: str = "ingest") -> Progress:
    bar: Progress = tqdm(total=total, desc=description, unit="img", dynamic_ncols=True)
    return bar


class Attempt:
    """One stream of an ingest run; `ended()` once it is over (its requests must stop)."""

    def __init__(self, number: int) -> None:
        self.number = number
        self._ended = False

    def end(self) -> None:
        self._ended = True

    def ended(self) -> bool:
        return self._ended


class IngestState:
    """Sequence numbers, unacknowledged items, resume decisions and the summary of one run.

    Thread-safe: with the sync client, the request side runs in gRPC's thread while acks
    are read in the caller's thread.
    """

    def __init__(
        self,
        options: pb.IngestRequest,
        *,
        window: int = 256,
        max_attempts: int | None = None,
        backoff: Backoff = Backoff(),
        progress: Progress | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.options = options
        self.window = window
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.progress = progress
        self.summary = IngestSummary()
        self.pending: dict[int, IngestItem] = {}  # seq -> item: sent or taken, not acked
        self.attempts = 0
        self.source_done = False
        self.source_error: BaseException | None = None
        self._failures_in_a_row = 0
        self._waited_s = 0.0  # backoff since the last ack
        self._next_seq = 0
        self._current: Attempt | None = None
        self._resend: collections.deque[int] = collections.deque()
        self._local: collections.deque[IngestResult] = collections.deque()
        self._lock = threading.Lock()

    @property
    def reconnects(self) -> int:
        return max(0, self.attempts - 1)

    # --- request side ------------------------------------------------------------------

    def begin_attempt(self) -> Attempt:
        """A new stream: everything still pending is queued to be sent again first."""
        with self._lock:
            self.attempts += 1
            self._current = Attempt(self.attempts)
            self._resend = collections.deque(self.pending)
            return self._current

    def end_attempt(self, attempt: Attempt) -> None:
        with self._lock:
            attempt.end()

    def next_resend(self, attempt: Attempt) -> tuple[int, IngestItem] | None:
        """The next pending item this attempt must send again, if any."""
        with self._lock:
            while attempt is self._current and self._resend:
                seq = self._resend.popleft()
                item = self.pending.get(seq)
                if item is not None:  # else acked or failed meanwhile
                    return seq, item
            return None

    def register(self, attempt: Attempt, item: IngestItem) -> int | None:
        """Give a new item from the source its seq; None if `attempt` already ended.

        An item taken by an attempt that ended meanwhile is not lost: it is queued for the
        current attempt to send.
        """
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self.pending[seq] = item
            if attempt.ended():
                if self._current is not None and self._current is not attempt:
                    self._resend.append(seq)
                return None
            return seq

    def source_finished(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.source_done = True
            if error is not None and self.source_error is None:
                self.source_error = error

    def message(self, seq: int, item: IngestItem) -> pb.IngestItem | None:
        """The item's wire form; None when it failed locally (unreadable file)."""
        try:
            return ingest_item(item, seq)
        except OSError as exc:
            self._fail_locally(seq, item, f"cannot read {item.path}: {exc.strerror or exc}")
        except ClipsearchError as exc:  # e.g. metadata that is not JSON
            self._fail_locally(seq, item, exc.message, exc.code.name)
        return None

    def bad_row(self, error: RowError) -> None:
        """A row the source could not turn into an item: a failed result, never sent."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._local.append(
                IngestResult(
                    seq=seq,
                    id=error.where,
                    status="failed",
                    error=error.reason,
                    error_code="INVALID_ARGUMENT",
                )
            )

    def _fail_locally(
        self, seq: int, item: IngestItem, error: str, code: str = "INVALID_ARGUMENT"
    ) -> None:
        with self._lock:
            if self.pending.pop(seq, None) is None:
                return
            self._local.append(
                IngestResult(seq=seq, id=item.label, status="failed", error=error, error_code=code)
            )

    # --- response side -----------------------------------------------------------------

    def acknowledged(self, ack: pb.IngestAck) -> IngestResult | None:
        """The result of an ack; None for an ack of an item no longer pending."""
        with self._lock:
            if self.pending.pop(ack.seq, None) is None:
                return None
            self._failures_in_a_row = 0
            self._waited_s = 0.0
        return self._record(ingest_result(ack))

    def local_results(self) -> list[IngestResult]:
        """Items that failed before being sent, since the last call."""
        with self._lock:
            results, self._local = list(self._local), collections.deque()
        return [self._record(result) for result in results]

    def _record(self, result: IngestResult) -> IngestResult:
        self.summary.add(result)
        if self.progress is not None:
            self.progress.update(1)
            if self.summary.failed or self.summary.skipped:
                self.progress.set_postfix_str(
                    f"failed={self.summary.failed} skipped={self.summary.skipped}", refresh=False
                )
        return result

    def after_stream(self, error: ClipsearchError | None) -> float | None:
        """Decide after a stream ended: None = all done; else seconds to wait, then resume.

        Raises the error when it is not resumable or the attempts are used up, and the
        source's own error once everything taken from it is acknowledged.
        """
        with self._lock:
            self.summary.reconnects = self.reconnects
            if error is None and not self.pending and self.source_done:
                if self.source_error is not None:
                    raise self.source_error
                return None
            if error is None:
                error = Unavailable(
                    f"the server ended the ingest stream with {len(self.pending)} items "
                    "unacknowledged"
                )
            if not resumable(error):
                raise error
            self._failures_in_a_row += 1
            delay = self.backoff.delay(self._failures_in_a_row)
            out_of_attempts = (
                self.max_attempts is not None and self._failures_in_a_row >= self.max_attempts
            )
            if out_of_attempts or self._waited_s + delay > self.backoff.give_up_s:
                raise type(error)(
                    f"ingest gave up after {self._failures_in_a_row} attempts without progress "
                    f"in {self._waited_s:.0f} s ({len(self.pending)} items unacknowledged): "
                    f"{error.message}",
                    error.code,
                )
            self._waited_s += delay
            return delay

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


# --- what both drivers share ------------------------------------------------------------


class _WouldBlock:
    """No slot free or no item read yet, while a message holds items: send it now."""


WOULD_BLOCK = _WouldBlock()


@dataclass(frozen=True)
class _End:
    """The source is exhausted, or raised `error`."""

    error: BaseException | None = None


class MessageBuilder:
    """Items gathered into one IngestRequest."""

    def __init__(self) -> None:
        self._items: list[pb.IngestItem] = []
        self._bytes = 0

    def __bool__(self) -> bool:
        return bool(self._items)

    def put(self, item: pb.IngestItem) -> Iterator[pb.IngestRequest]:
        """Add `item`; yields what must go now: the message in hand if `item` would take it
        past MAX_MESSAGE_BYTES (an empty message takes any item), then the new one if full."""
        size = item.ByteSize()
        if self._items and self._bytes + size > MAX_MESSAGE_BYTES:
            yield self.take()
        self._items.append(item)
        self._bytes += size
        if len(self._items) >= MAX_ITEMS_PER_MESSAGE or self._bytes >= MAX_MESSAGE_BYTES:
            yield self.take()

    def take(self) -> pb.IngestRequest:
        request = pb.IngestRequest(items=self._items)
        self._items, self._bytes = [], 0
        return request


def _next_in_memory(items: Iterator[IngestItem], state: IngestState) -> IngestItem | None:
    item = next(items, None)
    if item is None:
        state.source_finished()
    return item


def _registered(
    state: IngestState, attempt: Attempt, item: IngestItem | None
) -> tuple[int, IngestItem] | None:
    """`item` with the seq `attempt` registered it under; None at the end of the source, or
    if the attempt ended meanwhile (the item then waits for the next attempt)."""
    if item is None:
        return None
    seq = state.register(attempt, item)
    return None if seq is None else (seq, item)


def _results(state: IngestState, response: pb.IngestResponse) -> Iterator[IngestResult]:
    """The results of a response's acks, with any local failures reported meanwhile."""
    for ack in response.acks:
        result = state.acknowledged(ack)
        yield from state.local_results()
        if result is not None:
            yield result


# --- the sync driver -------------------------------------------------------------------

OpenSyncStream = Callable[[Iterator[pb.IngestRequest]], Iterable[pb.IngestResponse]]


class IngestRun:
    """What both drivers show of their run: its state, summary and reconnects so far."""

    def __init__(self, state: IngestState) -> None:
        self.state = state

    @property
    def summary(self) -> IngestSummary:
        return self.state.summary

    @property
    def reconnects(self) -> int:
        return self.state.reconnects


class SyncSource:
    """The caller's items, read in a thread of their own up to PREFETCH ahead, so that a
    message takes what is ready and never waits for a slow source while it holds items.
    A list or tuple is taken directly: it cannot keep anyone waiting."""

    def __init__(self, items: Iterable[IngestItem], state: IngestState) -> None:
        self._items = iter(items)
        self._in_memory = isinstance(items, (list, tuple))
        self._state = state
        self._queue: queue.Queue[IngestItem | _End] = queue.Queue(PREFETCH)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def get(self, attempt: Attempt, wait: bool) -> IngestItem | _WouldBlock | None:
        """The next item; None once the source is done or the attempt ended; WOULD_BLOCK
        when none is ready (within one poll if `wait`)."""
        if self._in_memory:
            return _next_in_memory(self._items, self._state)
        self._start()
        if self._state.source_done or attempt.ended():
            return None
        try:
            entry = self._queue.get(timeout=SLOT_POLL_S) if wait else self._queue.get_nowait()
        except queue.Empty:
            return None if attempt.ended() else WOULD_BLOCK
        if isinstance(entry, _End):
            self._state.source_finished(entry.error)
            return None
        return entry

    def close(self) -> None:
        self._closed.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._read, name="clipsearch-ingest-source", daemon=True
                )
                self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                item = next(self._items)
            except StopIteration:
                self._put(_End())
                return
            except RowError as exc:
                self._state.bad_row(exc)
                continue
            except Exception as exc:  # reported after what was sent is acknowledged
                self._put(_End(exc))
                return
            self._put(item)

    def _put(self, entry: IngestItem | _End) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=SLOT_POLL_S)
                return
            except queue.Full:
                continue


class SyncSender:
    """The request side of one sync run's attempts: slots, resends and source items gathered
    into messages."""

    def __init__(self, state: IngestState, source: SyncSource) -> None:
        self._state = state
        self._source = source

    def requests(self, attempt: Attempt, slots: threading.Semaphore) -> Iterator[pb.IngestRequest]:
        state = self._state
        yield state.options
        message = MessageBuilder()
        while True:
            entry = self.next(attempt, slots, wait=not message)
            if isinstance(entry, _WouldBlock):
                yield message.take()
                continue
            if entry is None:
                if message and not attempt.ended():
                    yield message.take()
                return
            item = state.message(*entry)
            if attempt.ended():
                return
            if item is None:
                slots.release()
                continue
            yield from message.put(item)

    def next(
        self, attempt: Attempt, slots: threading.Semaphore, wait: bool
    ) -> tuple[int, IngestItem] | _WouldBlock | None:
        """A slot and the next item to send (one to resend first), registered; None at the
        end or when the attempt ended; WOULD_BLOCK if `wait` is false and either is lacking."""
        if wait:
            while not slots.acquire(timeout=SLOT_POLL_S):
                if attempt.ended():
                    return None
        elif not slots.acquire(blocking=False):
            return WOULD_BLOCK
        while True:
            # Checked at every poll: an item an ended attempt took meanwhile comes back here.
            entry = self._state.next_resend(attempt)
            if entry is not None:
                return entry
            item = self._source.get(attempt, wait)
            if not isinstance(item, _WouldBlock):
                break
            if not wait:
                slots.release()
                return item
        return _registered(self._state, attempt, item)


class SyncIngestStream(IngestRun, Iterator[IngestResult]):
    """Results of `Client.ingest()` as they arrive; `.summary` counts them.

    Closing it (or breaking out of the loop and dropping it) cancels the stream.
    """

    def __init__(
        self, state: IngestState, items: Iterable[IngestItem], open_stream: OpenSyncStream
    ) -> None:
        super().__init__(state)
        self._source = SyncSource(items, state)
        # The request side (iterated by gRPC's thread) holds the source, not this stream,
        # so a stream the caller drops is collected, which cancels the call.
        self._sender = SyncSender(state, self._source)
        self._open_stream = open_stream
        self._results = self._run()

    def __iter__(self) -> SyncIngestStream:
        return self

    def __next__(self) -> IngestResult:
        return next(self._results)

    def close(self) -> None:
        self._results.close()

    def run(self) -> IngestSummary:
        """Consume all results; returns the summary."""
        for _ in self:
            pass
        return self.summary

    def _run(self) -> Generator[IngestResult]:
        state = self.state
        try:
            while True:
                attempt = state.begin_attempt()
                slots = threading.Semaphore(state.window)
                call = self._open_stream(self._sender.requests(attempt, slots))
                error: ClipsearchError | None = None
                try:
                    for response in call:
                        slots.release(len(response.acks))
                        yield from _results(state, response)
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                finally:
                    state.end_attempt(attempt)
                    cancel = getattr(call, "cancel", None)
                    if cancel is not None:
                        cancel()
                yield from state.local_results()
                delay = state.after_stream(error)
                if delay is None:
                    return
                time.sleep(delay)
        finally:
            self._source.close()
            state.close()


# --- the asyncio driver ----------------------------------------------------------------

OpenAsyncStream = Callable[[AsyncIterator[pb.IngestRequest]], AsyncIterable[pb.IngestResponse]]


class AsyncSource:
    """The caller's items (an iterable or an async iterable), read by a task of their own
    up to PREFETCH ahead, like `SyncSource`."""

    def __init__(
        self, items: Iterable[IngestItem] | AsyncIterable[IngestItem], state: IngestState
    ) -> None:
        self._items: Iterator[IngestItem] | AsyncIterator[IngestItem] = (
            aiter(items) if isinstance(items, AsyncIterable) else iter(items)
        )
        self._in_memory = isinstance(items, (list, tuple))
        self._state = state
        self._queue: asyncio.Queue[IngestItem | _End] = asyncio.Queue(PREFETCH)
        self._task: asyncio.Task[None] | None = None

    async def get(self, wait: bool) -> IngestItem | _WouldBlock | None:
        if self._in_memory:
            return _next_in_memory(cast(Iterator[IngestItem], self._items), self._state)
        if self._task is None:
            self._task = asyncio.create_task(self._read())
        if self._state.source_done:
            return None
        if wait:
            entry = await self._queue.get()
        else:
            try:
                entry = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return WOULD_BLOCK
        if isinstance(entry, _End):
            self._state.source_finished(entry.error)
            return None
        return entry

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        items = self._items
        while True:
            try:
                if isinstance(items, AsyncIterator):
                    item = await anext(items)
                else:
                    item = next(items)
            except (StopIteration, StopAsyncIteration):
                await self._queue.put(_End())
                return
            except RowError as exc:
                self._state.bad_row(exc)
                continue
            except Exception as exc:
                await self._queue.put(_End(exc))
                return
            await self._queue.put(item)


class AsyncIngestStream(IngestRun, AsyncIterator[IngestResult]):
    """Results of `AsyncClient.ingest()` as they arrive; `.summary` counts them."""

    def __init__(
        self,
        state: IngestState,
        items: Iterable[IngestItem] | AsyncIterable[IngestItem],
        open_stream: OpenAsyncStream,
    ) -> None:
        super().__init__(state)
        self._source = AsyncSource(items, state)
        self._open_stream = open_stream
        self._results = self._run()

    def __aiter__(self) -> AsyncIngestStream:
        return self

    async def __anext__(self) -> IngestResult:
        return await anext(self._results)

    async def aclose(self) -> None:
        await self._results.aclose()

    async def run(self) -> IngestSummary:
        """Consume all results; returns the summary."""
        async for _ in self:
            pass
        return self.summary

    async def _run(self) -> AsyncGenerator[IngestResult]:
        state = self.state
        try:
            while True:
                attempt = state.begin_attempt()
                slots = asyncio.Semaphore(state.window)
                call = self._open_stream(self._requests(attempt, slots))
                error: ClipsearchError | None = None
                try:
                    async for response in call:
                        for _ in response.acks:
                            slots.release()
                        for result in _results(state, response):
                            yield result
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                finally:
                    state.end_attempt(attempt)
                    slots.release()  # wake a request side waiting for a slot
                    cancel = getattr(call, "cancel", None)
                    if cancel is not None:
                        cancel()
                for local in state.local_results():
                    yield local
                delay = state.after_stream(error)
                if delay is None:
                    return
                await asyncio.sleep(delay)
        finally:
            await self._source.close()
            state.close()

    async def _requests(
        self, attempt: Attempt, slots: asyncio.Semaphore
    ) -> AsyncIterator[pb.IngestRequest]:
        state = self.state
        yield state.options
        message = MessageBuilder()
        while True:
            entry = await self._next(attempt, slots, wait=not message)
            if isinstance(entry, _WouldBlock):
                yield message.take()
                continue
            if entry is None:
                if message and not attempt.ended():
                    yield message.take()
                return
            if entry[1].path is not None:  # file reads off the event loop
                item = await asyncio.to_thread(state.message, *entry)
            else:
                item = state.message(*entry)
            if attempt.ended():
                return
            if item is None:
                slots.release()
                continue
            for request in message.put(item):
                yield request

    async def _next(
        self, attempt: Attempt, slots: asyncio.Semaphore, wait: bool
    ) -> tuple[int, IngestItem] | _WouldBlock | None:
        """Like `SyncSender.next`."""
        if wait:
            await slots.acquire()
        elif slots.locked():
            return WOULD_BLOCK
        else:
            await slots.acquire()  # free: returns at once
        if attempt.ended():
            return None
        entry = self.state.next_resend(attempt)
        if entry is not None:
            return entry
        item = await self._source.get(wait)
        if isinstance(item, _WouldBlock):
            slots.release()
            return item
        return _registered(self.state, attempt, item)
