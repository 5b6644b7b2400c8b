"""Group commits: many writers, one store call per batch, and a refused batch split so that
only the bad row fails. The store-backed tests write to a real Milvus Lite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.errors import ClipsearchError, InvalidInput, Unavailable
from clipsearch.server.group_commit import GroupCommit
from clipsearch.server.ingest import CollectionWriters
from clipsearch.server.store import MilvusStore, StoredItem, VectorStore

DIM = 8


class RefusingStore:
    """A real store that refuses any upsert holding the id `poison`, as Milvus refuses a
    batch: with a message that names the batch's rows."""

    def __init__(self, inner: VectorStore) -> None:
        self.inner = inner
        self.upserts: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upsert(self, name: str, items: Sequence[StoredItem]) -> None:
        ids = [item.id for item in items]
        self.upserts.append(ids)
        if "poison" in ids:
            raise InvalidInput(f"vector store refused the request: rows {ids}")
        self.inner.upsert(name, items)


def stored(item_id: str, seed: int) -> StoredItem:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return StoredItem(item_id, caption=f"caption of {item_id}", image_vector=vector)


@pytest.fixture
async def refusing(tmp_path: Path) -> AsyncIterator[tuple[RefusingStore, AsyncStore]]:
    store = RefusingStore(MilvusStore(str(tmp_path / "commits.db")))
    store.create_collection("c", DIM, "m")
    async_store = AsyncStore(store)
    try:
        yield store, async_store
    finally:
        await async_store.close()


async def test_a_refused_batch_is_split_so_only_the_bad_row_fails(
    refusing: tuple[RefusingStore, AsyncStore],
) -> None:
    store, async_store = refusing
    writers = CollectionWriters(async_store, batch=64, wait_ms=50.0, max_queue=100)
    ids = [f"ok-{i}" for i in range(5)] + ["poison"] + [f"ok-{i}" for i in range(5, 10)]
    try:
        outcomes = await asyncio.gather(
            *(writers.write("c", stored(i, n)) for n, i in enumerate(ids)),
            return_exceptions=True,
        )
    finally:
        await writers.close()
    failed = {i: o for i, o in zip(ids, outcomes, strict=True) if isinstance(o, BaseException)}
    assert list(failed) == ["poison"]
    error = failed["poison"]
    assert isinstance(error, InvalidInput)
    assert "ok-" not in str(error)  # the retry's own message: it names only this row
    assert store.upserts[0] == ids  # one shared batch, refused...
    assert sorted(store.upserts[1:]) == sorted([i] for i in ids)  # ...then each row apart
    assert store.inner.count("c") == 10
    assert store.inner.existing_ids("c", ids) == set(ids) - {"poison"}
    written = [o for o in outcomes if not isinstance(o, BaseException)]
    assert all(o.batch_size == 11 and o.store_us > 0 for o in written)


async def test_a_batch_without_a_bad_row_is_one_store_call(
    refusing: tuple[RefusingStore, AsyncStore],
) -> None:
    store, async_store = refusing
    writers = CollectionWriters(async_store, batch=4, wait_ms=50.0, max_queue=100)
    try:
        await asyncio.gather(*(writers.write("c", stored(f"x{i}", i)) for i in range(10)))
    finally:
        await writers.close()
    assert [len(batch) for batch in store.upserts] == [4, 4, 2]
    assert store.inner.count("c") == 10


async def test_an_error_of_the_store_itself_fails_the_batch_without_retries() -> None:
    calls: list[list[int]] = []

    async def commit(items: list[int]) -> None:
        calls.append(items)
        raise Unavailable("vector store unavailable: connection refused")

    group: GroupCommit[int] = GroupCommit(
        "t", commit, max_batch_size=8, max_wait_ms=20.0, max_queue=8
    )
    await group.start()
    try:
        outcomes = await asyncio.gather(*(group.write(i) for i in range(3)), return_exceptions=True)
    finally:
        await group.close()
    assert calls == [[0, 1, 2]]
    assert all(isinstance(o, Unavailable) for o in outcomes)


async def test_a_bug_in_a_row_is_internal_with_a_reference_and_no_details() -> None:
    async def commit(items: list[str]) -> None:
        if "bug" in items:
            raise ZeroDivisionError("secret detail of " + ",".join(items))

    group: GroupCommit[str] = GroupCommit(
        "t", commit, max_batch_size=8, max_wait_ms=20.0, max_queue=8
    )
    await group.start()
    try:
        outcomes = await asyncio.gather(
            *(group.write(i) for i in ("a", "bug", "b")), return_exceptions=True
        )
    finally:
        await group.close()
    assert not isinstance(outcomes[0], BaseException)
    assert not isinstance(outcomes[2], BaseException)
    error = outcomes[1]
    assert isinstance(error, ClipsearchError) and type(error) is ClipsearchError
    assert "ref " in str(error) and "secret" not in str(error)


async def test_closing_fails_what_is_still_queued_with_unavailable() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def commit(items: list[int]) -> None:
        started.set()
        await release.wait()

    group: GroupCommit[int] = GroupCommit(
        "t", commit, max_batch_size=1, max_wait_ms=0.0, max_queue=8
    )
    await group.start()
    writes = [asyncio.create_task(group.write(i)) for i in range(3)]
    await started.wait()  # the first write is in its commit, the others queued
    closing = asyncio.create_task(group.close())
    await asyncio.sleep(0)  # close() stops the batching loop before the commit returns
    release.set()
    await closing
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert not isinstance(outcomes[0], BaseException)
    assert all(isinstance(o, Unavailable) for o in outcomes[1:])


async def test_two_workers_commit_two_batches_at_once_and_ack_each_after_its_own() -> None:
    first_started, release_first = asyncio.Event(), asyncio.Event()
    calls: list[list[int]] = []

    async def commit(items: list[int]) -> None:
        calls.append(items)
        if 0 in items:
            first_started.set()
            await release_first.wait()

    group: GroupCommit[int] = GroupCommit(
        "t", commit, max_batch_size=2, max_wait_ms=20.0, max_queue=8, workers=2
    )
    await group.start()
    try:
        first = [asyncio.create_task(group.write(i)) for i in (0, 1)]
        await first_started.wait()
        second = [asyncio.create_task(group.write(i)) for i in (2, 3)]
        done = await asyncio.gather(*second)  # committed while the first batch is in its commit
        assert all(not task.done() for task in first)  # not acked before its own commit returns
        release_first.set()
        await asyncio.gather(*first)
    finally:
        await group.close()
    assert calls == [[0, 1], [2, 3]]
    assert [timing.batch_size for timing in done] == [2, 2]


async def test_with_two_workers_a_refused_batch_still_fails_only_the_bad_row(
    refusing: tuple[RefusingStore, AsyncStore],
) -> None:
    store, async_store = refusing
    writers = CollectionWriters(async_store, batch=4, wait_ms=50.0, max_queue=100, workers=2)
    ids = [f"ok-{i}" for i in range(6)] + ["poison"] + [f"ok-{i}" for i in range(6, 12)]
    try:
        outcomes = await asyncio.gather(
            *(writers.write("c", stored(i, n)) for n, i in enumerate(ids)),
            return_exceptions=True,
        )
    finally:
        await writers.close()
    failed = [i for i, o in zip(ids, outcomes, strict=True) if isinstance(o, BaseException)]
    assert failed == ["poison"]
    # Three batches of 4 and the last of 1; the refused batch again row by row.
    assert sorted(len(batch) for batch in store.upserts) == [1] * 5 + [4] * 3
    assert ["poison"] in store.upserts
    assert store.inner.count("c") == 12
    assert store.inner.existing_ids("c", ids) == set(ids) - {"poison"}


async def test_write_each_gives_every_item_its_own_outcome(
    refusing: tuple[RefusingStore, AsyncStore],
) -> None:
    store, async_store = refusing
    writers = CollectionWriters(async_store, batch=4, wait_ms=50.0, max_queue=100)
    ids = ["a", "b", "poison", "c", "d", "e"]
    try:
        outcomes = await writers.write_each("c", [stored(i, n) for n, i in enumerate(ids)])
    finally:
        await writers.close()
    errors = {i: o for i, o in zip(ids, outcomes, strict=True) if isinstance(o, ClipsearchError)}
    assert list(errors) == ["poison"] and isinstance(errors["poison"], InvalidInput)
    # One call for the whole group: batches of 4 and 2, the refused one then row by row.
    assert store.upserts == [["a", "b", "poison", "c"], ["a"], ["b"], ["poison"], ["c"], ["d", "e"]]
    sizes = [o.batch_size for o in outcomes if not isinstance(o, ClipsearchError)]
    assert sizes == [4, 4, 4, 2, 2]
    assert store.inner.existing_ids("c", ids) == set(ids) - {"poison"}
