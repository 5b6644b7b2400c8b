"""Streaming ingest: items in, one acknowledgement per item once it is written.

Each stream reads at most `ingest_window` items ahead of its acknowledgements, so a fast
producer is held back by gRPC flow control rather than by server memory. Items are processed
concurrently: image decode in the preprocess pool, both towers through their batchers at bulk
priority, then a group-commit writer per collection (a Batcher whose batch function is the
upsert) writes them to the store. An item is acknowledged OK only after its upsert returned;
a bad item is acknowledged FAILED with the reason and the stream goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.batcher import Batcher, Priority
from clipsearch.server.errors import (
    ClipsearchError,
    ErrorCode,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from clipsearch.server.interceptors import STATUS_OF
from clipsearch.server.pipeline import Encoded, EncodingPipeline
from clipsearch.server.store import StoredItem, VectorStore
from clipsearch.v1 import clipsearch_pb2 as pb

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 256
MAX_URI_LENGTH = 2048
MAX_CAPTION_LENGTH = 4096
MAX_METADATA_BYTES = 64 * 1024
OVERLOAD_PATIENCE_S = 60.0


def content_id(image: bytes) -> str:
    """The id of an item that came without one: re-ingesting the same bytes upserts it."""
    return hashlib.sha256(image).hexdigest()[:32]


def parse_metadata(raw: str) -> dict[str, Any]:
    if not raw:
        return {}
    if len(raw.encode()) > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata_json is over {MAX_METADATA_BYTES} bytes")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"metadata_json is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("metadata_json must be a JSON object")
    return value


def validate_item(item: pb.IngestItem) -> str:
    """Check an item's fields; returns its id (given, or the content hash)."""
    if not item.image:
        raise InvalidInput("the item has no image bytes")
    item_id = item.id or content_id(item.image)
    if len(item_id) > MAX_ID_LENGTH:
        raise InvalidInput(f"id is longer than {MAX_ID_LENGTH} characters")
    if len(item.uri) > MAX_URI_LENGTH:
        raise InvalidInput(f"uri is longer than {MAX_URI_LENGTH} characters")
    if len(item.caption) > MAX_CAPTION_LENGTH:
        raise InvalidInput(f"caption is longer than {MAX_CAPTION_LENGTH} characters")
    return item_id


class CollectionWriters:
    """One group-commit writer per collection, shared by all ingest streams."""

    def __init__(self, store: VectorStore, batch: int, wait_ms: float, max_queue: int) -> None:
        self._store = store
        self._batch = batch
        self._wait_ms = wait_ms
        self._max_queue = max_queue
        self._writers: dict[str, Batcher[StoredItem, None]] = {}
        self._closed = False

    async def write(self, collection: str, item: StoredItem) -> int:
        """Upsert one item in the collection's next group commit; returns store µs."""
        if self._closed:  # an item still in flight while the server stops
            raise Unavailable("the server is shutting down; the item was not written")
        writer = self._writers.get(collection)
        if writer is None:
            writer = Batcher(
                f"write:{collection}",
                lambda items: self._upsert(collection, items),
                max_batch_size=self._batch,
                max_wait_ms=self._wait_ms,
                max_queue=self._max_queue,
            )
            await writer.start()
            self._writers[collection] = writer
        (result,) = await writer.submit([item])
        return result.timing.inference_us

    def _upsert(self, collection: str, items: list[StoredItem]) -> list[None]:
        latest = {item.id: item for item in items}  # one row per id; the last version wins
        self._store.upsert(collection, list(latest.values()))
        return [None] * len(items)

    async def discard(self, collection: str) -> None:
        """Stop a dropped collection's writer (and its thread)."""
        writer = self._writers.pop(collection, None)
        if writer is not None:
            await writer.close()

    async def close(self) -> None:
        self._closed = True
        writers, self._writers = list(self._writers.values()), {}
        await asyncio.gather(*(w.close() for w in writers))


@dataclass
class IngestOutcome:
    """Counts of one stream, for the log line at its end."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0


class IngestSession:
    def __init__(
        self,
        pipeline: EncodingPipeline,
        store: AsyncStore,
        writers: CollectionWriters,
        options: pb.IngestOptions,
        window: int,
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.writers = writers
        self.collection = options.collection
        self.skip_existing = options.skip_existing
        self.window = window
        self.outcome = IngestOutcome()

    async def run(self, requests: AsyncIterator[pb.IngestRequest]) -> AsyncIterator[pb.IngestAck]:
        acks: asyncio.Queue[pb.IngestAck | BaseException | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task[None]] = set()

        async def process(item: pb.IngestItem) -> None:
            try:
                await acks.put(await self._ingest_one(item))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in requests:
                    if request.WhichOneof("message") != "item":
                        raise InvalidInput("after the first IngestOptions, send only items")
                    await slots.acquire()
                    task = asyncio.create_task(process(request.item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
                await acks.put(None)
            except BaseException as exc:  # stream broken or protocol error: end the stream
                await acks.put(exc)

        reader = asyncio.create_task(read())
        try:
            while True:
                ack = await acks.get()
                if ack is None:
                    break
                if isinstance(ack, BaseException):
                    raise ack
                yield ack
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            log.info(
                "ingest into %s: %d ok, %d failed, %d skipped",
                self.collection,
                self.outcome.ok,
                self.outcome.failed,
                self.outcome.skipped,
            )

    async def _ingest_one(self, item: pb.IngestItem) -> pb.IngestAck:
        started = time.perf_counter()
        ack = pb.IngestAck(seq=item.seq, id=item.id)
        try:
            ack.id = validate_item(item)
            metadata = parse_metadata(item.metadata_json)
            if self.skip_existing:
                existing, store_us = await self.store.existing_ids(self.collection, [ack.id])
                ack.timing.search_us += store_us
                if ack.id in existing:
                    ack.status = pb.INGEST_STATUS_SKIPPED
                    self.outcome.skipped += 1
                    return ack
            image_vector, caption_vector = await self._encode(item, ack)
            stored = StoredItem(
                id=ack.id,
                uri=item.uri,
                caption=item.caption,
                metadata=metadata,
                image_vector=image_vector,
                caption_vector=caption_vector,
            )
            ack.timing.search_us += await self.writers.write(self.collection, stored)
            ack.status = pb.INGEST_STATUS_OK
            self.outcome.ok += 1
        except ClipsearchError as exc:
            self._fail(ack, exc.code, str(exc))
        except Exception:
            log.exception("ingest of item seq=%d failed unexpectedly", item.seq)
            self._fail(ack, ErrorCode.INTERNAL, "internal error; the server log has details")
        finally:
            ack.timing.total_us = int((time.perf_counter() - started) * 1e6)
        return ack

    async def _encode(
        self, item: pb.IngestItem, ack: pb.IngestAck
    ) -> tuple[np.ndarray, np.ndarray | None]:
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
        ack.timing.queue_us = timing.queue_us
        ack.timing.preprocess_us = preprocess_us
        ack.timing.inference_us = timing.inference_us
        ack.timing.batch_size = timing.batch_size
        caption_vector = None
        if item.caption:
            caption_vector = encoded[1].vectors[0]
            ack.caption_truncated = encoded[1].truncated[0]
        return encoded[0].vectors[0], caption_vector

    def _fail(self, ack: pb.IngestAck, code: ErrorCode, message: str) -> None:
        ack.status = pb.INGEST_STATUS_FAILED
        ack.error = message
        ack.error_code = STATUS_OF[code].value[0]
        self.outcome.failed += 1


async def _patiently(submit: Callable[[], Awaitable[Encoded]]) -> Encoded:
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
