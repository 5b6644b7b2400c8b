"""Streaming ingest: items in, one outcome per item once it is written.

Each stream reads at most `ingest_window` items ahead of its outcomes, so a fast producer
is held back by gRPC flow control rather than by server memory. A stream's items are
processed in groups (`IngestSession`): checked against the store's rules
(`store.validation`, in bytes), images decoded in the preprocess pool, both towers through
their batchers at bulk priority, the vectors checked, then a group commit per collection,
shared by all streams, writes them to the store. Every stage keeps one outcome per item:
only valid items join a shared commit, so one stream's bad item never fails another's. An
item is OK only after its own upsert returned; a bad item is FAILED with the reason and
the stream goes on.

FAILED means "not written". An item whose write may or may not have happened, or could not
happen for a reason of the store's (unreachable after `store_retry_s` of retries, a write
applied in part, a full disk), is never acked: the stream ends with that error (UNAVAILABLE,
or RESOURCE_EXHAUSTED for a full disk) and the client's resume sends it again (an upsert by
id is idempotent). While the server drains (SIGTERM), streams take no new items: each
finishes what it holds, then ends UNAVAILABLE.

Items may carry vectors computed elsewhere (with the model the stream's options name, which
the service has checked against the collection's): those skip decoding and the towers, only
a caption that came without its vector is encoded (`IngestSession._take_carried`).

Transport-free: the service turns requests into `IngestItem`s and `ItemOutcome`s into acks.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar, cast

import numpy as np

from clipsearch.server.async_store import AsyncStore, retry_unavailable
from clipsearch.server.batcher import ItemTiming, Priority
from clipsearch.server.errors import (
    ClipsearchError,
    ErrorCode,
    InvalidInput,
    Overloaded,
    StorageFull,
    Unavailable,
)
from clipsearch.server.group_commit import CommitTiming, GroupCommit
from clipsearch.server.pipeline import EncodingPipeline, StageTiming
from clipsearch.server.store import StoredItem, validation
from clipsearch.server.text import TokenizedText
from clipsearch.server.vectors import from_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

OVERLOAD_PATIENCE_S = 60.0
ENCODING_GROUPS = 2  # groups of one stream being decoded and encoded at once
DEFAULT_STORE_RETRY_S = 30.0


def ends_the_stream(error: ClipsearchError) -> bool:
    """Errors after which an item's outcome is unknown or the store cannot take it: the item
    is not acked and the stream ends with the error, for the client to resume."""
    return isinstance(error, (Unavailable, StorageFull))


@dataclass(frozen=True)
class IngestOptions:
    collection: str
    skip_existing: bool = False
    vectors_model_id: str = ""  # the model of the vectors items carry (checked by the service)


@dataclass(frozen=True)
class IngestItem:
    seq: int
    image: bytes
    id: str = ""  # empty: the content hash of the image
    uri: str = ""
    caption: str = ""
    metadata_json: str = ""
    image_vector: bytes = b""  # little-endian float32, computed elsewhere: not encoded
    caption_vector: bytes = b""

    @property
    def carries_vectors(self) -> bool:
        return bool(self.image_vector or self.caption_vector)


class IngestStatus(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class IngestTiming:
    """Microseconds per stage of one item (`store_us`: the existence check and the write)."""

    queue_us: int = 0
    preprocess_us: int = 0
    inference_us: int = 0
    store_us: int = 0
    total_us: int = 0
    batch_size: int = 0


@dataclass(frozen=True)
class ItemOutcome:
    seq: int
    id: str
    status: IngestStatus
    error: str = ""
    error_code: ErrorCode | None = None
    caption_truncated: bool = False
    timing: IngestTiming = field(default_factory=IngestTiming)


@dataclass
class IngestCounts:
    """Counts of one stream, for the log line at its end."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0


def content_id(image: bytes) -> str:
    """The id of an item that came without one: re-ingesting the same bytes upserts it."""
    return hashlib.sha256(image).hexdigest()[:32]


def checked_fields(item: IngestItem) -> StoredItem:
    """The item's stored fields, checked by the store's rules; vectors come later."""
    if not item.image and not item.image_vector:
        raise InvalidInput("the item has no image bytes and no image vector")
    if item.image_vector and not item.id:
        raise InvalidInput("an item carrying its image vector needs an id")
    item_id = item.id or content_id(item.image)
    validation.check_id(item_id)
    fields = StoredItem(
        id=item_id,
        uri=item.uri,
        caption=item.caption,
        metadata=validation.parse_metadata(item.metadata_json, item_id),
    )
    validation.check_fields(fields)
    return fields


class CollectionWriters:
    """One group commit per collection, shared by all ingest streams, through the store's
    one executor (`AsyncStore`); `workers` commits of one collection in flight at once."""

    def __init__(
        self,
        store: AsyncStore,
        batch: int,
        wait_ms: float,
        max_queue: int,
        *,
        retry_s: float = DEFAULT_STORE_RETRY_S,
        workers: int = 1,
    ) -> None:
        self._store = store
        self._batch = batch
        self._workers = workers
        self._wait_ms = wait_ms
        self._max_queue = max_queue
        self.retry_s = retry_s
        self._writers: dict[str, GroupCommit[StoredItem]] = {}
        self._closed = False
        self.draining = asyncio.Event()

    def drain(self) -> None:
        """Ingest streams take no new items from now on (the server is stopping)."""
        self.draining.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def write(self, collection: str, item: StoredItem) -> CommitTiming:
        """Upsert one checked item in the collection's next group commit."""
        writer = await self._writer(collection)
        return await _patiently(lambda: writer.write(item))

    async def write_each(
        self, collection: str, items: Sequence[StoredItem]
    ) -> list[CommitTiming | ClipsearchError]:
        """Upsert checked items in the collection's next group commits: per item its
        timing, or its own error if it was not written."""
        writer = await self._writer(collection)
        return await _patiently(lambda: writer.write_each(items))

    async def _writer(self, collection: str) -> GroupCommit[StoredItem]:
        if self._closed:  # an item still in flight while the server stops
            raise Unavailable("the server is shutting down; the item was not written")
        writer = self._writers.get(collection)
        if writer is None:

            async def upsert(items: list[StoredItem]) -> None:
                await retry_unavailable(
                    lambda: self._store.upsert(collection, items),
                    self.retry_s,
                    f"writing {len(items)} items to {collection}",
                    stop=lambda: self._closed,
                )

            writer = GroupCommit(
                f"write:{collection}",
                upsert,
                max_batch_size=self._batch,
                max_wait_ms=self._wait_ms,
                max_queue=self._max_queue,
                workers=self._workers,
            )
            await writer.start()
            self._writers[collection] = writer
        return writer

    async def discard(self, collection: str) -> None:
        """Stop a dropped collection's writer."""
        writer = self._writers.pop(collection, None)
        if writer is not None:
            await writer.close()

    async def close(self) -> None:
        self._closed = True
        writers, self._writers = list(self._writers.values()), {}
        await asyncio.gather(*(w.close() for w in writers))


@dataclass
class _Work:
    """One item of a group on its way through the stages; `outcome` once it is settled."""

    item: IngestItem
    arrived: float  # perf_counter() when the stream read it
    id: str
    fields: StoredItem | None = None
    pixels: np.ndarray | None = None
    image_vector: np.ndarray | None = None
    caption_vector: np.ndarray | None = None
    preprocess_us: int = 0
    stage: StageTiming = field(default_factory=StageTiming)
    truncated: bool = False
    store_us: int = 0
    outcome: ItemOutcome | None = None
    settled: bool = False  # has an outcome, or ends the stream unacknowledged


class IngestSession:
    """One ingest stream. Items are taken in groups: while ENCODING_GROUPS groups of this
    stream are being decoded and encoded, the items read meanwhile wait and form the next
    group (up to the towers' batch size), so a busy stream reaches the towers in full
    batches and pays the thread-pool and event-loop hops per group, not per item, while a
    lone item after a quiet spell goes at once."""

    def __init__(
        self,
        pipeline: EncodingPipeline,
        store: AsyncStore,
        writers: CollectionWriters,
        options: IngestOptions,
        window: int,
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.writers = writers
        self.collection = options.collection
        self.skip_existing = options.skip_existing
        self.vectors_model_id = options.vectors_model_id
        self.window = window
        # A group goes to a tower in one submit, which must fit its queue.
        self.group_size = max(
            1, min(min(b.max_batch_size, b.max_queue) for b in pipeline.batchers.values())
        )
        self.counts = IngestCounts()

    async def run(self, items: AsyncIterator[IngestItem]) -> AsyncIterator[list[ItemOutcome]]:
        """One outcome per item, in the order they complete, those of items that completed
        together in one list. An exception from `items` (a broken stream, a protocol error)
        ends the run with that exception."""
        outcomes: asyncio.Queue[list[ItemOutcome] | BaseException | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task[None]] = set()
        waiting: list[tuple[IngestItem, float]] = []  # read, not yet in a group
        free = ENCODING_GROUPS  # groups this stream may start encoding now
        stopping = False

        draining = self.writers.draining

        def start_groups() -> None:
            nonlocal free
            while waiting and free > 0 and not stopping:
                free -= 1
                group = waiting[: self.group_size]
                del waiting[: self.group_size]
                task = asyncio.create_task(process(group))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def process(group: list[tuple[IngestItem, float]]) -> None:
            encoding = True

            def encoded() -> None:  # the next group may start encoding
                nonlocal encoding, free
                if encoding:
                    encoding = False
                    free += 1
                    start_groups()

            try:
                done, error = await self._ingest_group(group, encoded)
                if done:
                    await outcomes.put(done)
                if error is not None:  # the rest are not acked: the stream ends with it
                    await outcomes.put(error)
            finally:
                encoded()
                for _ in group:
                    slots.release()

        async def take_items() -> None:
            async for item in items:
                await slots.acquire()
                if draining.is_set():  # an item read as the drain began: never acked
                    return
                waiting.append((item, time.perf_counter()))
                start_groups()

        async def read() -> None:
            try:
                await _unless(take_items(), draining)
                while tasks:  # a finishing group starts the next: wait until none is left
                    await asyncio.gather(*tasks)
                if draining.is_set():
                    raise Unavailable(
                        "the server is shutting down; resume the stream to send the items "
                        "not yet acknowledged"
                    )
                await outcomes.put(None)
            except BaseException as exc:  # stream broken or protocol error: end the stream
                await outcomes.put(exc)

        reader = asyncio.create_task(read())
        try:
            while True:
                outcome = await outcomes.get()
                if outcome is None:
                    break
                if isinstance(outcome, BaseException):
                    raise outcome
                yield outcome
        finally:
            stopping = True
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            log.info(
                "ingest into %s: %d ok, %d failed, %d skipped",
                self.collection,
                self.counts.ok,
                self.counts.failed,
                self.counts.skipped,
            )

    async def _ingest_group(
        self, group: Sequence[tuple[IngestItem, float]], encoded: Callable[[], None]
    ) -> tuple[list[ItemOutcome], ClipsearchError | None]:
        """The outcomes of a group's items, and the error that ends the stream if one came
        up (its items and those not yet settled are then left unacknowledged). `encoded()`
        is called once the group no longer needs the towers."""
        works = [_Work(item, arrived, item.id) for item, arrived in group]
        stream_error: ClipsearchError | None = None

        def settle(work: _Work, status: IngestStatus, error: ClipsearchError | None = None) -> None:
            nonlocal stream_error
            work.settled = True
            if error is not None and ends_the_stream(error):
                stream_error = stream_error or error
                return
            work.outcome = self._outcome(work, status, error)

        def live() -> list[_Work]:
            return [w for w in works if not w.settled and stream_error is None]

        try:
            for work in works:
                try:
                    work.fields = checked_fields(work.item)
                    work.id = work.fields.id
                    self._take_carried(work)
                except ClipsearchError as exc:
                    settle(work, IngestStatus.FAILED, exc)
            if self.skip_existing and live():
                await self._skip_existing(live(), settle)
            if live():
                await self._encode_group(live(), settle)
            encoded()
            pending = live()
            stored: list[StoredItem] = []
            for work, checked in zip(
                pending,
                validation.check_vectors_each(
                    [
                        replace(
                            cast(StoredItem, w.fields),
                            image_vector=w.image_vector,
                            caption_vector=w.caption_vector,
                        )
                        for w in pending
                    ],
                    self.pipeline.dim,
                ),
                strict=True,
            ):
                if isinstance(checked, ClipsearchError):
                    settle(work, IngestStatus.FAILED, checked)
                else:
                    stored.append(checked)
            writing = live()
            if writing:
                committed = await self.writers.write_each(self.collection, stored)
                for work, result in zip(writing, committed, strict=True):
                    if isinstance(result, ClipsearchError):
                        settle(work, IngestStatus.FAILED, result)
                    else:
                        work.store_us += result.store_us
                        settle(work, IngestStatus.OK)
        except ClipsearchError as exc:  # of the whole group (the store, a closed batcher)
            for work in works:
                if not work.settled:
                    settle(work, IngestStatus.FAILED, exc)
        except Exception:
            log.exception("ingest of items seq=%d.. failed unexpectedly", works[0].item.seq)
            error = ClipsearchError("internal error; the server log has details")
            for work in works:
                if not work.settled:
                    settle(work, IngestStatus.FAILED, error)
        return [w.outcome for w in works if w.outcome is not None], stream_error

    def _outcome(
        self, work: _Work, status: IngestStatus, error: ClipsearchError | None
    ) -> ItemOutcome:
        if status is IngestStatus.OK:
            self.counts.ok += 1
        elif status is IngestStatus.SKIPPED:
            self.counts.skipped += 1
        else:
            self.counts.failed += 1
        stage = work.stage
        return ItemOutcome(
            seq=work.item.seq,
            id=work.id,
            status=status,
            error=str(error) if error is not None else "",
            error_code=error.code if error is not None else None,
            caption_truncated=work.truncated,
            timing=IngestTiming(
                queue_us=stage.queue_us,
                preprocess_us=work.preprocess_us,
                inference_us=stage.inference_us,
                store_us=work.store_us,
                total_us=int((time.perf_counter() - work.arrived) * 1e6),
                batch_size=stage.batch_size,
            ),
        )

    async def _skip_existing(self, works: list[_Work], settle: _Settle) -> None:
        existing, check_us = await retry_unavailable(
            lambda: self.store.existing_ids(self.collection, [w.id for w in works]),
            self.writers.retry_s,
            f"checking ids in {self.collection}",
            stop=lambda: self.writers.closed,
        )
        for work in works:
            work.store_us += check_us
            if work.id in existing:
                settle(work, IngestStatus.SKIPPED)

    async def _encode_group(self, works: list[_Work], settle: _Settle) -> None:
        """Both towers' vectors of `works`, at bulk priority: images decoded in a few pool
        calls, captions tokenized in one, then each tower's items submitted at once (one
        batch when the tower is free). An item whose image, caption or batch failed is
        settled with that error. Vectors an item carried are not encoded again."""
        pictured = [w for w in works if w.image_vector is None]
        captioned = [w for w in works if w.item.caption and w.caption_vector is None]
        images, (tokens, tokenize_us) = await asyncio.gather(
            self.pipeline.preprocess_images_each([w.item.image for w in pictured]),
            self.pipeline.tokenize_each([w.item.caption for w in captioned]),
        )
        decoded: list[_Work] = []
        for work, image in zip(pictured, images, strict=True):
            if isinstance(image, ClipsearchError):
                settle(work, IngestStatus.FAILED, image)
            else:
                work.pixels, work.preprocess_us = image
                decoded.append(work)
        texts: list[tuple[_Work, TokenizedText]] = []
        for work, token in zip(captioned, tokens, strict=True):
            if isinstance(token, ClipsearchError):
                if not work.settled:
                    settle(work, IngestStatus.FAILED, token)
            elif not work.settled:
                texts.append((work, token))
        decoded = [w for w in decoded if not w.settled]  # a bad caption fails its item
        vision = self.pipeline.vision_batcher
        text = self.pipeline.text_batcher
        pixels = [cast(np.ndarray, w.pixels) for w in decoded]
        token_list = [t for _, t in texts]
        image_results, text_results = await asyncio.gather(
            _patiently(lambda: vision.submit_each(pixels, Priority.BULK)),
            _patiently(lambda: text.submit_each(token_list, Priority.BULK)),
        )
        for work, result in zip(decoded, image_results, strict=True):
            if isinstance(result, BaseException):
                settle(work, IngestStatus.FAILED, _domain_error(result))
            else:
                work.image_vector = result.value
                work.stage = _stage(result.timing)
        for (work, token), result in zip(texts, text_results, strict=True):
            if isinstance(result, BaseException):
                if not work.settled:
                    settle(work, IngestStatus.FAILED, _domain_error(result))
            else:
                work.caption_vector = result.value
                work.truncated = token.truncated
                work.stage = work.stage.combine(
                    replace(_stage(result.timing), preprocess_us=tokenize_us)
                )

    def _take_carried(self, work: _Work) -> None:
        """The vectors `work`'s item carries, parsed (never encoded); what it lacks (the image
        of an item carrying only its caption vector, a caption without its vector) is left
        for `_encode_group`."""
        item = work.item
        if not item.carries_vectors:
            return
        if not self.vectors_model_id:
            raise InvalidInput(
                f"item {item.id!r} carries vectors but the stream's options name no "
                "vectors_model_id (the model that computed them)"
            )
        if item.caption_vector and not item.caption:
            raise InvalidInput(f"item {item.id!r} has a caption vector but no caption")
        dim = self.pipeline.dim
        if item.image_vector:
            work.image_vector = from_bytes(
                item.image_vector, dim, f"item {item.id!r}: image vector"
            )
        if item.caption_vector:
            work.caption_vector = from_bytes(
                item.caption_vector, dim, f"item {item.id!r}: caption vector"
            )


class _Settle(Protocol):
    def __call__(
        self, work: _Work, status: IngestStatus, error: ClipsearchError | None = None
    ) -> None: ...


def _stage(timing: ItemTiming) -> StageTiming:
    return StageTiming(
        queue_us=timing.queue_us, inference_us=timing.inference_us, batch_size=timing.batch_size
    )


def _domain_error(exc: BaseException) -> ClipsearchError:
    if isinstance(exc, ClipsearchError):
        return exc
    log.error("ingest: an unexpected error from a tower", exc_info=exc)
    return ClipsearchError("internal error; the server log has details")


async def _unless(work: Coroutine[object, object, None], stop: asyncio.Event) -> None:
    """Run `work` to its end, or until `stop` is set: then it is cancelled (an item that
    arrives meanwhile is left unread) and an error it raised is dropped (the stream ends
    with the drain's error instead). Racing the stream's end once, not every read, keeps
    the tasks and wake-ups of a race off the per-item path."""
    if stop.is_set():
        work.close()
        return
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
    await asyncio.wait({task})
    if task.cancelled() or stop.is_set():
        if not task.cancelled():
            task.exception()  # retrieved: the drain's error is the one to report
        return
    task.result()


async def _patiently(submit: Callable[[], Awaitable[T]]) -> T:
    """Bulk work waits for queue room instead of failing: other streams will drain it."""
    deadline = time.monotonic() + OVERLOAD_PATIENCE_S
    delay = 0.005
    while True:
        try:
            return await submit()
        except Overloaded:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
