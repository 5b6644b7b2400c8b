"""Ingest in groups: a stream's items reach the towers together, in full batches once items
queue up, and each item still gets its own outcome. An `IngestSession` on a FakeBackend
(the bundle's real tokenizer and image preprocessing) and an InMemoryStore, no transport.

The towers' batch sizes are read from the batchers' batch hook, the one the metrics'
histogram records; a gate on the first image batch holds the towers until the session has
read the whole stream, so what queues up behind it is known, not timed."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable

import numpy as np
from image_fixtures import encode, pattern
from server_fixtures import served_model

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.bundle import load_bundle
from clipsearch.server.fake import FakeBackend
from clipsearch.server.images import ImagePreprocessor
from clipsearch.server.ingest import (
    CollectionWriters,
    IngestItem,
    IngestOptions,
    IngestSession,
    IngestStatus,
    ItemOutcome,
)
from clipsearch.server.pipeline import EncodingPipeline
from clipsearch.server.store import StoredItem
from clipsearch.server.store.memory import InMemoryStore
from clipsearch.server.text import TextTokenizer

BUNDLE = load_bundle(served_model())
BATCH = 32


def jpeg(seed: int) -> bytes:
    return encode(pattern((40 + seed % 30, 32), seed=seed), "JPEG", quality=90)


def items(count: int, caption: Callable[[int], str] = lambda i: f"pattern {i}") -> list[IngestItem]:
    return [IngestItem(seq=i, image=jpeg(i), id=f"i{i}", caption=caption(i)) for i in range(count)]


class Towers:
    """Batch sizes per tower as the batch hook saw them; the first image batch waits for
    `release` (set once the session has read the whole stream)."""

    def __init__(self, pipeline: EncodingPipeline) -> None:
        self.sizes: dict[str, list[int]] = {"vision": [], "text": []}
        self.release = threading.Event()
        self._gated = False
        for tower, batcher in pipeline.batchers.items():
            batcher.on_batch = lambda n, _s, tower=tower: self.sizes[tower].append(n)

    def gate(self, batch: np.ndarray) -> bool:
        if batch.ndim == 4 and not self._gated:  # images: [n, 3, S, S]
            self._gated = True
            assert self.release.wait(30), "the stream was never read to its end"
        return False


async def ingest(
    sent: list[IngestItem], *, window: int = 128, gate: bool = True
) -> tuple[list[list[ItemOutcome]], Towers, dict[str, StoredItem]]:
    """The outcomes as the session yields them (those that completed together in one list),
    the towers' batch sizes, and what the store holds afterwards."""
    towers: Towers | None = None

    def fail_when(batch: np.ndarray) -> bool:
        assert towers is not None
        return towers.gate(batch) if gate else False

    backend = FakeBackend.for_manifest(BUNDLE.manifest, fail_when)
    pipeline = EncodingPipeline(
        backend,
        TextTokenizer.from_bundle(BUNDLE),
        ImagePreprocessor.from_bundle(BUNDLE),
        max_batch_size=BATCH,
        max_wait_ms=0.0,
    )
    towers = Towers(pipeline)
    memory = InMemoryStore()
    memory.create_collection("c", backend.dim, "m")
    store = AsyncStore(memory)
    writers = CollectionWriters(store, batch=64, wait_ms=5.0, max_queue=4096)
    await pipeline.start()

    async def stream(chosen: Iterable[IngestItem]) -> AsyncIterator[IngestItem]:
        for item in chosen:
            yield item
        towers.release.set()  # asked for one more: every item has been read

    try:
        session = IngestSession(pipeline, store, writers, IngestOptions("c"), window)
        replies = [reply async for reply in session.run(stream(sent))]
        held = memory.get("c", [item.id for item in sent], include_vectors=True)
    finally:
        towers.release.set()
        await writers.close()
        await pipeline.close()
        await store.close()
    return replies, towers, {item.id: item for item in held}


def flat(replies: list[list[ItemOutcome]]) -> list[ItemOutcome]:
    return [outcome for reply in replies for outcome in reply]


async def test_a_64_item_stream_reaches_the_towers_in_full_batches() -> None:
    replies, towers, held = await ingest(items(64))
    outcomes = flat(replies)
    assert sorted(o.seq for o in outcomes) == list(range(64))
    assert sorted(len(reply) for reply in replies)[-2:] == [30, 32]  # a reply per group
    assert {o.status for o in outcomes} == {IngestStatus.OK}
    # The first two groups go at once, an item each (a lone item never waits for company);
    # the other 62 queue up behind them and reach each tower as a full batch and the rest.
    for tower in ("vision", "text"):
        sizes = towers.sizes[tower]
        assert sum(sizes) == 64 and sorted(sizes)[-2:] == [30, 32], (tower, sizes)
        assert len(sizes) in (3, 4)  # the first two items alone or together
    batch_sizes = Counter(o.timing.batch_size for o in outcomes)
    assert (batch_sizes[32], batch_sizes[30]) == (32, 30)
    assert len(held) == 64


async def test_one_item_after_another_goes_at_once_alone() -> None:
    replies, towers, _ = await ingest(items(1))
    outcomes = flat(replies)
    assert [o.status for o in outcomes] == [IngestStatus.OK]
    assert towers.sizes == {"vision": [1], "text": [1]}


async def test_bad_items_of_a_group_fail_alone_and_the_rest_are_written() -> None:
    sent = items(40, caption=lambda i: "" if i % 2 else f"pattern {i}")
    sent[5] = IngestItem(seq=5, image=b"\xff\xd8\xff not a jpeg", id="i5")
    sent[20] = IngestItem(seq=20, image=jpeg(20), id="i20", caption="x" * 70_000)
    sent[33] = IngestItem(seq=33, image=jpeg(33), id="i33", metadata_json="[1]")
    replies, towers, held = await ingest(sent)
    outcomes = flat(replies)
    by_seq = {o.seq: o for o in outcomes}
    assert sorted(by_seq) == list(range(40))
    failed = {s for s, o in by_seq.items() if o.status is IngestStatus.FAILED}
    assert failed == {5, 20, 33}
    assert all(by_seq[s].error for s in failed)
    assert sorted(held) == sorted(f"i{s}" for s in set(range(40)) - failed)
    # Only the valid items reach the towers: not 5 (no image), 20 (caption too long) or 33
    # (bad metadata); the text tower gets the captions of the even seqs but 20.
    assert sum(towers.sizes["vision"]) == 37
    assert sum(towers.sizes["text"]) == 19
    assert held["i0"].caption_vector is not None and held["i1"].caption_vector is None


async def test_the_window_bounds_a_group() -> None:
    replies, towers, _ = await ingest(items(24), window=4, gate=False)
    outcomes = flat(replies)
    assert sorted(o.seq for o in outcomes) == list(range(24))
    assert max(towers.sizes["vision"]) <= 4
    assert sum(towers.sizes["vision"]) == 24
