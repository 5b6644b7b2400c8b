"""Prometheus metrics, scraped over HTTP from a real server after real calls, and the
batchers' live figures in Info (`clipsearch info --stats`).

The counters must move by exactly the calls made: each test scrapes before and after its
calls and compares the differences.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import encode, pattern
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import ThreadedServer, quick_settings, served_model

from clipsearch.cli import main
from clipsearch.client import Client, IngestItem, NotFound, Unauthenticated
from clipsearch.server.app import ClipSearchServer, fake_components
from clipsearch.server.async_store import AsyncStore
from clipsearch.server.batcher import MicroBatcher, Priority
from clipsearch.server.errors import ConfigurationError, DeadlineExceeded
from clipsearch.server.metrics import ServerMetrics
from clipsearch.server.security import ListenError
from clipsearch.server.settings import Settings
from clipsearch.server.store.memory import InMemoryStore

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return parse(reply.read().decode())


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, metric: str, /, **labels: str) -> float:
    return value(after, metric, **labels) - value(before, metric, **labels)


def jpeg(seed: int) -> bytes:
    return encode(pattern((64 + seed, 48), seed=seed), "JPEG", quality=90)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """The real thing: the demo model on ONNX Runtime, Milvus Lite, metrics on."""
    db = tmp_path_factory.mktemp("metrics") / "m.db"
    settings = quick_settings(db, served_model(), metrics_port=free_port())
    with ThreadedServer(settings) as running:
        yield running


def test_counters_move_by_exactly_the_calls_made(server: ThreadedServer) -> None:
    port = server.settings.metrics_port
    with Client(server.address) as client:
        client.create_collection("exact", exist_ok=True)
        before = scrape(port)
        for query in ("a red square", "a blue circle", "stripes"):
            client.search(query, collection="exact")
        with pytest.raises(NotFound):
            client.search("anything", collection="no_such_collection")
        items = [IngestItem(id=f"i{k}", image=jpeg(k), caption=f"item {k}") for k in range(3)]
        broken = IngestItem(id="broken", image=b"\xff\xd8 not a jpeg")
        first = client.ingest([*items, broken], collection="exact").run()
        again = client.ingest(items, collection="exact", skip_existing=True).run()
        info = client.info()
    after = scrape(port)
    assert (first.ok, first.failed, again.skipped) == (3, 1, 3)

    assert moved(before, after, "clipsearch_requests_total", rpc="Search", code="OK") == 3
    assert moved(before, after, "clipsearch_requests_total", rpc="Search", code="NOT_FOUND") == 1
    assert moved(before, after, "clipsearch_requests_total", rpc="Ingest", code="OK") == 2
    assert moved(before, after, "clipsearch_rpc_duration_seconds_count", rpc="Search") == 4
    assert moved(before, after, "clipsearch_rpc_handler_delay_seconds_count", rpc="Search") == 4
    # Stages come from the replies: three searches answered, the NOT_FOUND one had none.
    for stage in ("preprocess", "queue", "inference", "search"):
        count = "clipsearch_stage_duration_seconds_count"
        assert moved(before, after, count, rpc="Search", stage=stage) == 3, stage
    # Ingest: one store_write per written item (3) and per existence check (3 skipped).
    count = "clipsearch_stage_duration_seconds_count"
    assert moved(before, after, count, rpc="Ingest", stage="store_write") == 6
    assert moved(before, after, count, rpc="Ingest", stage="inference") == 3
    for outcome, n in (("ok", 3), ("failed", 1), ("skipped", 3)):
        assert moved(before, after, "clipsearch_ingest_items_total", outcome=outcome) == n
    # The missing collection: the store said NOT_FOUND once, to the catalog's describe.
    errors = "clipsearch_store_errors_total"
    assert moved(before, after, errors, operation="describe", code="NOT_FOUND") == 1
    assert (
        moved(before, after, "clipsearch_store_call_duration_seconds_count", operation="search")
        == 3
    )

    # The histogram of batch sizes counts exactly the batches the batcher ran, and Info
    # reports the same live figures.
    for tower in ("text", "vision"):
        batches = value(after, "clipsearch_batcher_batches_total", tower=tower)
        assert value(after, "clipsearch_batch_size_count", tower=tower) == batches
        assert value(after, "clipsearch_batch_size_sum", tower=tower) == value(
            after, "clipsearch_batcher_items_total", tower=tower
        )
        model = info.model_name
        runs = "clipsearch_inference_duration_seconds_count"
        assert value(after, runs, tower=tower, model=model) == batches
        stats = {b.name: b for b in info.batchers}[tower]
        assert stats.batches == batches
        assert stats.mean_batch_size == pytest.approx(stats.items / stats.batches)
    # Text: 3 searches + 3 captions; vision: 3 images (the broken one never decoded).
    assert moved(before, after, "clipsearch_batcher_items_total", tower="text") == 6
    assert moved(before, after, "clipsearch_batcher_items_total", tower="vision") == 3
    for tower in ("text", "vision"):
        for priority in ("interactive", "bulk"):
            assert value(after, "clipsearch_queue_depth", tower=tower, priority=priority) == 0


def test_model_info_names_the_served_model(server: ThreadedServer) -> None:
    with Client(server.address) as client:
        info = client.info()
    samples = scrape(server.settings.metrics_port)
    for tower, tower_info in (("text", info.text), ("vision", info.vision)):
        labels = {
            "tower": tower,
            "name": info.model_name,
            "family": info.model_family,
            "precision": tower_info.precision,
            "provider": tower_info.providers[0],
        }
        assert value(samples, "clipsearch_model_info", **labels) == 1
    assert tower_info.providers[0] == "CPUExecutionProvider"


def test_info_stats_on_the_command_line(
    server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(server.address) as client:
        client.encode_texts(["one", "two"])
        stats = {b.name: b for b in client.info().batchers}
    assert main(["info", "--server", server.address, "--stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("batcher"))
    assert header.split()[:5] == ["batcher", "queued", "(bulk)", "batches", "items"]
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1 :]}
    assert set(rows) == {"text", "vision"}
    text = rows["text"]
    assert text[1:3] == ["0", "0"]
    assert int(text[3]) >= stats["text"].batches and int(text[4]) >= stats["text"].items


async def test_metrics_are_off_by_default_and_validated(tmp_path: Path) -> None:
    server = ClipSearchServer(quick_settings(tmp_path / "x.db"), fake_components())
    assert server.metrics is None and server.telemetry is None
    with pytest.raises(ConfigurationError, match="metrics_port=7000 is the gRPC port"):
        Settings(port=7000, metrics_port=7000)
    with pytest.raises(ConfigurationError, match="metrics_port must be >= 0"):
        Settings(metrics_port=-1)


def test_a_taken_metrics_port_is_refused_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ThreadedServer(quick_settings(tmp_path / "x.db", metrics_port=port))
        try:
            with pytest.raises(ListenError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                server.start()
        finally:
            server.close()


def test_two_servers_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    first = quick_settings(tmp_path / "a.db", metrics_port=free_port(), auth_token="secret")
    second = quick_settings(tmp_path / "b.db", metrics_port=free_port())
    with (
        ThreadedServer(first, fake_components()) as a,
        ThreadedServer(second, fake_components()) as b,
    ):
        with Client(a.address) as anonymous, pytest.raises(Unauthenticated):
            anonymous.count(collection="x")
        with Client(a.address, token="secret") as client:
            client.encode_texts(["x"])
        with Client(b.address) as client:
            for _ in range(2):
                client.encode_texts(["y"])
        samples_a, samples_b = scrape(first.metrics_port), scrape(second.metrics_port)
    requests = "clipsearch_requests_total"
    assert value(samples_a, requests, rpc="Count", code="UNAUTHENTICATED") == 1
    assert value(samples_a, requests, rpc="Encode", code="OK") == 1
    assert value(samples_b, requests, rpc="Encode", code="OK") == 2
    assert value(samples_b, requests, rpc="Count", code="UNAUTHENTICATED") == 0


async def test_batcher_drops_are_counted_by_reason() -> None:
    metrics = ServerMetrics()

    class Slow(MicroBatcher[int, int]):
        async def _execute(self, payloads: list[int]) -> list[int]:
            await asyncio.sleep(0.05)
            return payloads

    batcher = Slow("text", max_batch_size=1, max_wait_ms=0)
    metrics.watch_towers({"text": batcher}, "m")
    await batcher.start()
    try:
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.01)  # the first batch is running: what follows queues
        expired = asyncio.create_task(batcher.submit([2], deadline=time.monotonic()))
        cancelled = asyncio.create_task(batcher.submit([3], Priority.BULK))
        await asyncio.sleep(0)
        samples = parse(metrics.text().decode())
        assert value(samples, "clipsearch_queue_depth", tower="text", priority="interactive") == 1
        assert value(samples, "clipsearch_queue_depth", tower="text", priority="bulk") == 1
        cancelled.cancel()
        assert (await first)[0].value == 1
        with pytest.raises(DeadlineExceeded):
            await expired
        await asyncio.gather(cancelled, return_exceptions=True)
        done = await batcher.submit([4])
        assert done[0].value == 4
    finally:
        await batcher.close()
    samples = parse(metrics.text().decode())
    dropped = "clipsearch_batcher_dropped_items_total"
    assert value(samples, dropped, tower="text", reason="expired") == 1
    assert value(samples, dropped, tower="text", reason="cancelled") == 1
    assert value(samples, "clipsearch_batch_size_count", tower="text") == 2
    assert (
        value(samples, "clipsearch_inference_duration_seconds_count", tower="text", model="m") == 2
    )


async def test_store_calls_are_timed_and_errors_counted_by_code() -> None:
    metrics = ServerMetrics()
    store = AsyncStore(InMemoryStore())
    metrics.watch_store(store)
    try:
        await store.create_collection("c", 4, "model")
        with pytest.raises(Exception, match="c2"):
            await store.count("c2")
        count, _ = await store.count("c")
        assert count == 0
        await store.search("c", np.ones(4, np.float32) / 2, "image", 3)
    finally:
        await store.close()
    samples = parse(metrics.text().decode())
    calls = "clipsearch_store_call_duration_seconds_count"
    assert value(samples, calls, operation="count") == 2
    assert value(samples, calls, operation="create_collection") == 1
    assert value(samples, calls, operation="search") == 1
    assert value(samples, "clipsearch_store_errors_total", operation="count", code="NOT_FOUND") == 1
    assert (
        value(samples, "clipsearch_store_errors_total", operation="search", code="NOT_FOUND") == 0
    )
