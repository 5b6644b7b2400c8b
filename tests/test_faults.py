"""Faults: store outages, unknown write outcomes, drain and resume, a full disk (issue 9,
defects 3, 4 and 9).

A real gRPC server on port 0 with the fake inference backend (fast, exact) and a real store:
Milvus Lite, a real `milvus-server` process killed with -9 and restarted, or an in-memory
store wrapped to fail the way an unreachable Milvus does. The counts asserted are exact:
every item written once, acked once, nothing acked FAILED that is stored.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from server_fixtures import ThreadedServer, quick_settings
from store_fixtures import MilvusServerError, MilvusServerProcess

from clipsearch.bench.faults import (
    BackgroundIngest,
    HealthWatch,
    at_acks,
    health_status,
    make_items,
    store_counts,
    stored_ids,
    tiny_filesystem,
)
from clipsearch.client import AsyncClient, Backoff, Client, ResourceExhausted, Unavailable
from clipsearch.client.ingest import IngestState
from clipsearch.client.types import IngestItem
from clipsearch.server.app import Components, fake_components
from clipsearch.server.errors import ErrorCode, StorageFull
from clipsearch.server.errors import Unavailable as StoreUnavailable
from clipsearch.server.settings import Settings
from clipsearch.server.store import MilvusStore, StoredItem, VectorStore, milvus_errors
from clipsearch.server.store.memory import InMemoryStore
from clipsearch.v1 import clipsearch_pb2 as pb

COLLECTION = "faults"
QUICK_BACKOFF = Backoff(initial_s=0.05, maximum_s=0.5, give_up_s=30.0)


def fake_encoder_with(store: Any) -> Components:
    """The fake backend (exact, fast) in front of `store` (a factory of settings)."""
    return Components(encoder=fake_components().encoder, store=store)


def lite_components() -> Components:
    return fake_encoder_with(MilvusStore.from_settings)


# --- the client's resume: long enough for a restart ------------------------------------


def test_the_default_resume_waits_at_least_a_minute_before_giving_up() -> None:
    state = IngestState(pb.IngestRequest(), window=4)
    state.pending[0] = make_items(1)[0]  # one item never acknowledged
    waits: list[float] = []
    with pytest.raises(Unavailable, match="gave up after"):
        while True:
            delay = state.after_stream(Unavailable("server restarting"))
            assert delay is not None
            waits.append(delay)
    assert 60.0 <= sum(waits) <= Backoff().give_up_s
    assert waits[0] < 0.5  # a blip is retried at once
    assert waits == sorted(waits[:6]) + waits[6:]  # exponential, then capped


# --- error mapping ------------------------------------------------------------------------


def test_a_full_disk_is_resource_exhausted_disk_full_never_internal() -> None:
    from pymilvus.exceptions import MilvusException

    lite = MilvusException(code=1, message="[Errno 28] No space left on device")
    for exc in (lite, OSError(errno.ENOSPC, "No space left on device")):
        error = milvus_errors.translate(exc, "c")
        assert isinstance(error, StorageFull)
        assert error.code is ErrorCode.RESOURCE_EXHAUSTED
        assert "disk full" in str(error)


def test_a_connection_broken_mid_call_is_unavailable() -> None:
    from pymilvus.exceptions import MilvusException

    for message in ("Connection reset by peer", "Socket closed", "failed to connect to all"):
        error = milvus_errors.translate(MilvusException(code=1, message=message), "c")
        assert error.code is ErrorCode.UNAVAILABLE, message


# --- a store that is down, or whose writes have unknown outcomes ------------------------


class FlakyStore:
    """An InMemoryStore whose upserts fail with Unavailable while `down`; with `applied`
    the write happens before the error (a connection reset after Milvus applied it)."""

    def __init__(self) -> None:
        self.inner = InMemoryStore()
        self.down = threading.Event()
        self.applied = False
        self.failed_upserts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upsert(self, name: str, items: Sequence[StoredItem]) -> None:
        if self.down.is_set():
            self.failed_upserts += 1
            if self.applied:
                self.inner.upsert(name, items)
            raise StoreUnavailable("vector store unavailable: connection reset")
        self.inner.upsert(name, items)

    def check_health(self) -> None:
        if self.down.is_set():
            raise StoreUnavailable("vector store unavailable: connection refused")


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[tuple[FlakyStore, ThreadedServer]]:
    store = FlakyStore()
    settings = quick_settings(tmp_path / "unused.db", store_retry_s=1.0, store_probe_s=0.1)

    def factory(settings: Settings) -> VectorStore:
        return store  # type: ignore[return-value]  # the protocol, by delegation

    with ThreadedServer(settings, fake_encoder_with(factory)) as server:
        yield store, server


def test_a_short_outage_is_held_and_retried_no_item_fails(
    flaky: tuple[FlakyStore, ThreadedServer],
) -> None:
    store, server = flaky
    store.down.set()
    ingest = BackgroundIngest(server.address, make_items(40), backoff=QUICK_BACKOFF).start()
    deadline = time.monotonic() + 10
    while store.failed_upserts < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    store.down.clear()  # back within store_retry_s: the held write goes through
    ingest.wait(30)
    counts = store_counts(server.address, ingest)
    assert store.failed_upserts >= 2
    assert (counts["acked_ok"], counts["acked_failed"], counts["stored"]) == (40, 0, 40)
    assert ingest.reconnects == 0 and ingest.error is None


def test_unknown_outcomes_are_never_acked_failed_and_the_resume_writes_each_once(
    flaky: tuple[FlakyStore, ThreadedServer],
) -> None:
    store, server = flaky
    store.applied = True  # each failing write did happen: FAILED would be a lie

    def outage() -> None:
        store.down.set()
        time.sleep(2.5)  # longer than store_retry_s: the stream must end UNAVAILABLE
        store.down.clear()

    ingest = BackgroundIngest(server.address, make_items(120), window=8, backoff=QUICK_BACKOFF)
    ingest.on_ack = at_acks(20, outage)
    ingest.start().wait(60)
    acked = ingest.ids("ok")
    counts = store_counts(server.address, ingest)
    assert counts["acked_failed"] == 0
    assert ingest.reconnects >= 1  # the stream ended UNAVAILABLE and the client resumed
    assert (len(acked), len(set(acked)), counts["stored"]) == (120, 120, 120)
    assert counts["duplicate_acks"] == 0 and ingest.error is None


def test_a_store_down_past_the_bound_ends_the_stream_unavailable_without_failed_acks(
    flaky: tuple[FlakyStore, ThreadedServer],
) -> None:
    store, server = flaky
    store.down.set()
    ingest = BackgroundIngest(
        server.address, make_items(10), backoff=QUICK_BACKOFF, max_attempts=1
    ).start()
    ingest.wait(30)
    assert isinstance(ingest.error, Unavailable), ingest.error
    assert ingest.results == []  # nothing acked, least of all FAILED


def test_health_follows_the_store_and_comes_back_by_itself(
    flaky: tuple[FlakyStore, ThreadedServer],
) -> None:
    store, server = flaky
    with HealthWatch(server.address, interval_s=0.05) as health:
        assert health.wait_for("SERVING", 5)
        store.down.set()
        assert health.wait_for("NOT_SERVING", 5)
        store.down.clear()
        assert health.wait_for("SERVING", 5)
    assert health.saw("SERVING", "NOT_SERVING", "SERVING")


# --- drain and resume (SIGTERM) --------------------------------------------------------


def test_a_draining_server_ends_streams_and_the_resume_outlasts_a_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "drain.db"
    settings = quick_settings(db, grace_period_s=10.0)
    server = ThreadedServer(settings, lite_components())
    server.start()
    stopped = threading.Event()
    timings: dict[str, float] = {}
    acked_at_stop: list[int] = []
    ingest = BackgroundIngest(server.address, make_items(600), window=32)  # default backoff

    def sigterm() -> None:
        started = time.monotonic()
        server.stop(grace=10.0)
        timings["drain_s"] = time.monotonic() - started
        acked_at_stop.append(len(ingest.ids("ok")))
        stopped.set()

    ingest.on_ack = at_acks(150, sigterm)
    try:
        ingest.start()
        assert stopped.wait(60)
        # Everything the drained server wrote was acked: it took no new items after SIGTERM
        # and ended the streams itself, long before the grace period.
        with MilvusStore(str(db)) as store:
            written = store.count(COLLECTION)
        assert timings["drain_s"] < 5.0
        assert written == acked_at_stop[0]
        time.sleep(5.0)  # down for longer than the old resume (5 attempts, ~3 s) waited
        server.start()
        ingest.wait(120)
        counts = store_counts(server.address, ingest)
    finally:
        server.close()
    assert ingest.error is None, ingest.error
    assert (counts["acked_ok"], counts["acked_failed"], counts["stored"]) == (600, 0, 600)
    assert counts["duplicate_acks"] == 0 and counts["reconnects"] >= 1


def _stored_once(server: ThreadedServer, ids: list[str]) -> tuple[int, set[str]]:
    with Client(server.address, timeout=60) as client:
        return client.count(collection=COLLECTION), stored_ids(client, ids)


def test_a_generator_source_outlasts_two_restarts_and_each_item_is_stored_once(
    tmp_path: Path,
) -> None:
    items = make_items(300)
    ids = [item.id for item in items]
    server = ThreadedServer(quick_settings(tmp_path / "gen.db"), lite_components())
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            stream = client.ingest(
                (item for item in items), collection=COLLECTION, window=32, backoff=QUICK_BACKOFF
            )
            results = []
            for result in stream:
                results.append(result)
                if len(results) in (60, 180):
                    server.restart()  # the stream in flight is cut off
        count, stored = _stored_once(server, ids)
    finally:
        server.close()
    assert sorted(r.id for r in results) == ids  # each reported once
    assert {r.status for r in results} == {"ok"}
    assert stream.reconnects >= 2
    assert (count, stored) == (300, set(ids))


async def test_an_async_generator_source_outlasts_a_restart_and_each_item_is_stored_once(
    tmp_path: Path,
) -> None:
    items = make_items(200)
    ids = [item.id for item in items]

    async def source() -> AsyncIterator[IngestItem]:
        for item in items:
            await asyncio.sleep(0)
            yield item

    server = ThreadedServer(quick_settings(tmp_path / "agen.db"), lite_components())
    server.start()
    try:
        async with AsyncClient(server.address, timeout=60) as client:
            stream = client.ingest(
                source(), collection=COLLECTION, window=32, backoff=QUICK_BACKOFF
            )
            results = []
            async for result in stream:
                results.append(result)
                if len(results) == 80:
                    await asyncio.to_thread(server.restart)
        count, stored = await asyncio.to_thread(_stored_once, server, ids)
    finally:
        server.close()
    assert sorted(r.id for r in results) == ids
    assert {r.status for r in results} == {"ok"}
    assert stream.reconnects >= 1
    assert (count, stored) == (200, set(ids))


def test_a_stream_opened_while_draining_takes_nothing(tmp_path: Path) -> None:
    with ThreadedServer(quick_settings(tmp_path / "d.db"), lite_components()) as server:
        assert server.server is not None
        runtime = server.server.service.runtime
        assert runtime is not None
        runtime.writers.drain()
        with Client(server.address) as client:
            stream = client.ingest(make_items(5), collection=COLLECTION, max_attempts=1)
            with pytest.raises(Unavailable, match="shutting down"):
                list(stream)
            runtime.writers.draining.clear()
            assert client.count(collection=COLLECTION) == 0


# --- a real Milvus server killed and restarted mid-ingest ------------------------------


def port_in_time_wait() -> int:
    """A loopback port left in TIME_WAIT, as kill -9 of a server leaves its port when a client
    was connected: the server's side of the connection closes first."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port: int = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()
        client.recv(1)  # the server's FIN
        client.close()
    with socket.socket() as probe, pytest.raises(OSError) as taken:  # bind as milvus-server did
        probe.bind(("127.0.0.1", port))
    assert taken.value.errno == errno.EADDRINUSE
    return port


def test_a_proxy_port_taken_by_another_socket_fails_the_start_at_once(
    tmp_path: Path, milvus_server_path: str
) -> None:
    milvus = MilvusServerProcess(tmp_path / "milvus", milvus_server_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", milvus.port))
        holder.listen()
        started = time.monotonic()
        with pytest.raises(MilvusServerError, match=f"not {milvus.port}"):
            milvus.start(timeout_s=120)  # it moved to another port: no waiting on this one
    assert time.monotonic() - started < 60


@pytest.mark.slow  # starts a Milvus server (~10 s)
def test_milvus_serves_on_its_port_left_in_time_wait(
    tmp_path: Path, milvus_server_path: str
) -> None:
    milvus = MilvusServerProcess(tmp_path / "milvus", milvus_server_path)
    milvus.port = port_in_time_wait()
    try:
        milvus.start()  # milvus-server used to serve on port + 1 and this waited in vain
    finally:
        milvus.stop()


@pytest.mark.slow
def test_milvus_killed_and_restarted_mid_ingest_loses_nothing(
    tmp_path: Path, milvus_server_path: str
) -> None:
    milvus = MilvusServerProcess(tmp_path / "milvus", milvus_server_path)
    milvus.start()
    settings = quick_settings(
        tmp_path / "unused.db", milvus_uri=milvus.uri, store_probe_s=0.3, store_retry_s=5.0
    )
    killed = threading.Event()
    try:
        with (
            ThreadedServer(settings, lite_components()) as server,
            HealthWatch(server.address) as health,
        ):

            def kill() -> None:
                milvus.kill()
                killed.set()

            ingest = BackgroundIngest(server.address, make_items(900), window=32)
            ingest.on_ack = at_acks(200, kill)
            ingest.start()
            assert killed.wait(60)
            assert health.wait_for("NOT_SERVING", 15)
            # 10-20 s here (stale sessions of the killed process expire first, see
            # MilvusServerProcess); the bound is generous, the client's resume waits 120 s.
            milvus.start(timeout_s=240)
            ingest.wait(150)
            assert health.wait_for("SERVING", 60)
            counts = store_counts(server.address, ingest)
    finally:
        milvus.stop()
    assert ingest.error is None, ingest.error
    assert (counts["acked_ok"], counts["acked_failed"], counts["stored"]) == (900, 0, 900)
    assert counts["duplicate_acks"] == 0 and counts["acked_ok_missing"] == 0
    assert health.saw("SERVING", "NOT_SERVING", "SERVING")


# --- a full disk ---------------------------------------------------------------------------


def test_a_full_disk_acks_only_what_is_visible_and_says_disk_full(tmp_path: Path) -> None:
    with tiny_filesystem(tmp_path / "tiny", "2m") as tiny:
        settings = quick_settings(tiny / "full.db", store_probe_s=0.1)
        with ThreadedServer(settings, lite_components()) as server:
            ingest = BackgroundIngest(server.address, make_items(4000), window=32).start()
            ingest.wait(120)
            error = ingest.error
            assert isinstance(error, ResourceExhausted), error
            assert "disk full" in error.message
            assert server.server is not None and server.server.service.runtime is not None
            store = server.server.service.runtime.store.store
            assert isinstance(store, MilvusStore)
            with pytest.raises(StorageFull):  # no flush that would hide the memtable's rows
                store._flush_idle(COLLECTION)
            counts = store_counts(server.address, ingest)
            status = health_status(server.address)
            assert server.server.store_healthy is False
    ok = counts["acked_ok"]
    assert ok > 100  # the disk took some before it filled
    assert counts["acked_ok_missing"] == 0  # acked = visible to Get ...
    assert counts["stored"] >= ok  # ... and counted (written, unacked items may be extra)
    assert counts["failed_but_stored"] == 0
    assert status == "NOT_SERVING"
