"""Streaming ingest: items in, one outcome per item once it is written.

Each stream reads at most `ingest_window` items ahead of its outcomes, so a fast producer
is held back by gRPC flow control rather than by server memory. Items are processed
concurrently: checked against the store's rules (`store.validation`, in bytes) on arrival,
image decode in the preprocess pool, both towers through their batchers at bulk priority,
the vectors checked, then a group commit per collection, shared by all streams, writes
them to the store. Only valid items join a shared commit, so one stream's bad item never
fails another's. An item is OK only after its upsert returned; a bad item is FAILED with
the reason and the stream goes on.

FAILED means "not written". An item whose write may or may not have happened, or could not
happen for a reason of the store's (unreachable after `store_retry_s` of retries, a write
applied in part, a full disk), is never acked: the stream ends with that error (UNAVAILABLE,
or RESOURCE_EXHAUSTED for a full disk) and the client's resume sends it again (an upsert by
id is idempotent). While the server drains (SIGTERM), streams take no new items: each
finishes what it holds, then ends UNAVAILABLE.

Items may carry vectors computed elsewhere (with the model the stream's options name, which
the service has checked against the collection's): those skip decoding and the towers, only
a caption that came without its vector is encoded (`IngestSession._carried`).

Transport-free: the service turns requests into `IngestItem`s and `ItemOutcome`s into acks.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar, cast

import numpy as np

from clipsearch.server.async_store import AsyncStore, retry_unavailable
from clipsearch.server.batcher import Priority
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
from clipsearch.server.vectors import from_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

OVERLOAD_PATIENCE_S = 60.0
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
        return await _patiently(lambda: writer.write(item))

    async def discard(self, collection: str) -> None:
        """Stop a dropped collection's writer."""
        writer = self._writers.pop(collection, None)
        if writer is not None:
            await writer.close()

    async def close(self) -> None:
        self._closed = True
        writers, self._writers = list(self._writers.values()), {}
        await asyncio.gather(*(w.close() for w in writers))


class IngestSession:
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
        self.counts = IngestCounts()

    async def run(self, items: AsyncIterator[IngestItem]) -> AsyncIterator[ItemOutcome]:
        """One outcome per item, in the order they complete. An exception from `items`
        (a broken stream, a protocol error) ends the run with that exception."""
        outcomes: asyncio.Queue[ItemOutcome | BaseException | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task[None]] = set()

        draining = self.writers.draining

        async def process(item: IngestItem) -> None:
            try:
                await outcomes.put(await self._ingest_one(item))
            except ClipsearchError as exc:  # not acked: the stream ends with it
                await outcomes.put(exc)
            finally:
                slots.release()

        async def read() -> None:
            try:
                source = aiter(items)
                while (item := await _next_unless(source, draining)) is not None:
                    await slots.acquire()
                    if draining.is_set():  # an item read as the drain began: never acked
                        break
                    task = asyncio.create_task(process(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
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

    async def _ingest_one(self, item: IngestItem) -> ItemOutcome:
        started = time.perf_counter()
        item_id, store_us = item.id, 0
        stage, preprocess_us, truncated = StageTiming(), 0, False

        def outcome(status: IngestStatus, error: ClipsearchError | None = None) -> ItemOutcome:
            if status is IngestStatus.OK:
                self.counts.ok += 1
            elif status is IngestStatus.SKIPPED:
                self.counts.skipped += 1
            else:
                self.counts.failed += 1
            return ItemOutcome(
                seq=item.seq,
                id=item_id,
                status=status,
                error=str(error) if error is not None else "",
                error_code=error.code if error is not None else None,
                caption_truncated=truncated,
                timing=IngestTiming(
                    queue_us=stage.queue_us,
                    preprocess_us=preprocess_us,
                    inference_us=stage.inference_us,
                    store_us=store_us,
                    total_us=int((time.perf_counter() - started) * 1e6),
                    batch_size=stage.batch_size,
                ),
            )

        try:
            fields = checked_fields(item)
            item_id = fields.id
            if self.skip_existing:
                existing, check_us = await retry_unavailable(
                    lambda: self.store.existing_ids(self.collection, [item_id]),
                    self.writers.retry_s,
                    f"checking ids in {self.collection}",
                    stop=lambda: self.writers.closed,
                )
                store_us += check_us
                if item_id in existing:
                    return outcome(IngestStatus.SKIPPED)
            vectors = self._carried(item) if item.carries_vectors else self._encode(item)
            image_vector, caption_vector, preprocess_us, stage, truncated = await vectors
            stored = validation.check_vectors(
                replace(fields, image_vector=image_vector, caption_vector=caption_vector),
                self.pipeline.dim,
            )
            committed = await self.writers.write(self.collection, stored)
            store_us += committed.store_us
            return outcome(IngestStatus.OK)
        except ClipsearchError as exc:
            if ends_the_stream(exc):
                raise
            return outcome(IngestStatus.FAILED, exc)
        except Exception:
            log.exception("ingest of item seq=%d failed unexpectedly", item.seq)
            error = ClipsearchError("internal error; the server log has details")
            return outcome(IngestStatus.FAILED, error)

    async def _encode(
        self, item: IngestItem
    ) -> tuple[np.ndarray, np.ndarray | None, int, StageTiming, bool]:
        """Image vector, caption vector, preprocess µs, the towers' timing, truncated."""
        pixels, preprocess_us = await self.pipeline.preprocess_image(item.image)
        jobs = [_patiently(lambda: self.pipeline.encode_pixels([pixels], Priority.BULK))]
        if item.caption:
            jobs.append(
                _patiently(lambda: self.pipeline.encode_texts([item.caption], Priority.BULK))
            )
        encoded = await asyncio.gather(*jobs)
        timing = encoded[0].timing
        for more in encoded[1:]:
            timing = timing.combine(more.timing)
        if not item.caption:
            return encoded[0].vectors[0], None, preprocess_us, timing, False
        image, caption = encoded
        return image.vectors[0], caption.vectors[0], preprocess_us, timing, caption.truncated[0]

    async def _carried(
        self, item: IngestItem
    ) -> tuple[np.ndarray, np.ndarray | None, int, StageTiming, bool]:
        """`_encode` for an item carrying vectors: those are parsed, never encoded; a caption
        without its vector is encoded, as is the image of an item carrying only its caption
        vector."""
        if not self.vectors_model_id:
            raise InvalidInput(
                f"item {item.id!r} carries vectors but the stream's options name no "
                "vectors_model_id (the model that computed them)"
            )
        if item.caption_vector and not item.caption:
            raise InvalidInput(f"item {item.id!r} has a caption vector but no caption")
        dim = self.pipeline.dim
        image = caption = None
        if item.image_vector:
            image = from_bytes(item.image_vector, dim, f"item {item.id!r}: image vector")
        if item.caption_vector:
            caption = from_bytes(item.caption_vector, dim, f"item {item.id!r}: caption vector")
        preprocess_us, timing, truncated = 0, StageTiming(), False
        if image is None:
            pixels, preprocess_us = await self.pipeline.preprocess_image(item.image)
            pictured = await _patiently(
                lambda: self.pipeline.encode_pixels([pixels], Priority.BULK)
            )
            image, timing = pictured.vectors[0], pictured.timing
        elif item.caption and caption is None:
            texted = await _patiently(
                lambda: self.pipeline.encode_texts([item.caption], Priority.BULK)
            )
            caption, timing, truncated = texted.vectors[0], texted.timing, texted.truncated[0]
        return image, caption, preprocess_us, timing, truncated


_END = object()


async def _next_unless(source: AsyncIterator[IngestItem], stop: asyncio.Event) -> IngestItem | None:
    """The next item of `source`; None at its end or once `stop` is set (then an item that
    arrives meanwhile is left unread)."""
    if stop.is_set():
        return None
    reading: asyncio.Future[object] = asyncio.ensure_future(anext(source, _END))
    stopping: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not reading.done():
            reading.cancel()
    if not reading.done() or reading.cancelled():
        return None
    if stop.is_set():
        reading.exception()  # retrieved: the stream ends with the drain's error instead
        return None
    item = reading.result()
    return None if item is _END else cast(IngestItem, item)


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
