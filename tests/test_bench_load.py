"""`clipsearch bench load` against real gRPC servers on port 0.

Most tests use the fake service (FakeBackend + InMemoryStore, fast and exact); one drives the
`bench latency` preset against a real `clipsearch serve` process on the demo model. The
open-loop tests inject a server whose text tower sleeps, so the latency the generator must
report is bounded below by arithmetic on the schedule.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from server_fixtures import ThreadedServer, quick_settings, served_model

from clipsearch.bench.commands import LOAD_SCENARIOS
from clipsearch.bench.load import (
    LoadConfig,
    RemoteAddressError,
    Step,
    check_loopback,
    run_load,
    target_host,
)
from clipsearch.bench.load_engine import Record, StepRun
from clipsearch.bench.load_report import summarize
from clipsearch.bench.load_workload import SCENARIOS, parse_mix
from clipsearch.cli import main as cli_main
from clipsearch.client import Client
from clipsearch.server.app import Components, fake_components, served_bundle
from clipsearch.server.fake import FakeBackend
from clipsearch.server.settings import Settings
from clipsearch.server.store.memory import InMemoryStore

SLOW_S = 0.05


class SlowTextBackend(FakeBackend):
    """A text tower that takes SLOW_S per batch: with max_batch_size 1 and one inference
    worker, the server answers at most one text request per SLOW_S."""

    def run_text(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        time.sleep(SLOW_S)
        return super().run_text(feeds)


def slow_components() -> Components:
    def encoder(settings: Settings) -> FakeBackend:
        manifest = served_bundle(settings).manifest
        return SlowTextBackend(manifest.dim, eos_id=manifest.text.eos_id)

    return Components(encoder=encoder, store=lambda settings: InMemoryStore())


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    settings = quick_settings(tmp_path_factory.mktemp("load") / "unused.db", served_model())
    with ThreadedServer(settings, fake_components()) as server:
        yield server


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    settings = quick_settings(
        tmp_path_factory.mktemp("slow") / "unused.db", served_model(), max_batch_size=1
    )
    with ThreadedServer(settings, slow_components()) as server:
        yield server


def config(server: ThreadedServer, **overrides: Any) -> LoadConfig:
    base = LoadConfig(
        server=server.address, duration_s=30.0, warmup_s=0.0, progress=False, ceiling=False
    )
    return replace(base, **overrides)


def count(server: ThreadedServer, collection: str) -> int:
    with Client(server.address) as client:
        return client.count(collection=collection)


# --- closed loop ---------------------------------------------------------------------------


def test_closed_loop_sends_exactly_max_requests(fake_server: ThreadedServer) -> None:
    cfg = config(fake_server, mix=(("ingest", 1.0),), collection="exact", max_requests=23)
    report = run_load(cfg, [Step("closed", 4)])

    (step,) = report.steps
    assert (step.scheduled, step.completed, step.ok, step.errors) == (23, 23, 23, {})
    assert step.dropped == 0
    assert count(fake_server, "exact") == 23  # the server saw every request, once
    assert step.batch_size is not None and step.batch_size >= 1
    assert step.round_trip_ms is not None and step.latency_ms == step.round_trip_ms


def test_closed_loop_split_across_processes_keeps_the_count(fake_server: ThreadedServer) -> None:
    cfg = config(
        fake_server,
        mix=(("ingest", 1.0),),
        collection="split",
        max_requests=11,
        ingest_items=2,
        processes=2,
    )
    report = run_load(cfg, [Step("closed", 3)])

    (step,) = report.steps
    assert (step.completed, step.ok) == (11, 11)
    assert count(fake_server, "split") == 22


def test_warmup_requests_are_not_measured(fake_server: ThreadedServer) -> None:
    cfg = config(
        fake_server, mix=(("ingest", 1.0),), collection="warm", warmup_s=0.5, max_requests=5
    )
    report = run_load(cfg, [Step("closed", 1)])

    assert report.steps[0].completed == 5
    assert count(fake_server, "warm") > 5  # the warm-up's requests reached the server too


def test_errors_are_counted_by_status_code(fake_server: ThreadedServer) -> None:
    cfg = config(fake_server, collection="missing", max_requests=7)
    report = run_load(cfg, [Step("closed", 2), Step("open", 200)])

    closed, opened = report.steps
    assert (closed.ok, closed.errors) == (0, {"NOT_FOUND": 7})
    assert closed.latency_ms is None and closed.throughput == 0
    assert (opened.ok, opened.errors, opened.dropped) == (0, {"NOT_FOUND": 7}, 0)


# --- open loop -----------------------------------------------------------------------------


def test_open_loop_latency_counts_from_the_due_time(slow_server: ThreadedServer) -> None:
    """Due every 20 ms, served one at a time in 50 ms: request k is due at 20k ms and
    answered no sooner than 50(k + 1) ms, so its latency is at least 50 + 30k ms though each
    round trip is only about 50 ms."""
    rate, n = 50.0, 10
    cfg = config(slow_server, mix=(("encode-text", 1.0),), max_requests=n, max_in_flight=1)
    report = run_load(cfg, [Step("open", rate)])

    (step,) = report.steps
    assert (step.scheduled, step.completed, step.ok, step.dropped) == (n, n, n, 0)
    assert step.latency_ms is not None and step.round_trip_ms is not None
    floor_ms = [1000 * (SLOW_S + k * (SLOW_S - 1 / rate)) for k in range(n)]
    assert step.latency_ms.max >= floor_ms[-1]
    assert step.latency_ms.p50 >= floor_ms[n // 2 - 1]
    assert step.round_trip_ms.p50 >= SLOW_S * 1000
    assert step.latency_ms.mean > step.round_trip_ms.mean + 100  # the queueing shows
    assert step.server_ms["inference"] >= SLOW_S * 1000
    assert step.late >= n - 1  # request k >= 1 went out >= 30k ms after its due time
    assert step.send_lag_ms is not None and step.send_lag_ms.max >= 30 * (n - 1)


def test_open_loop_counts_what_it_could_not_send_as_dropped(slow_server: ThreadedServer) -> None:
    """16 requests due in 0.31 s, one in flight at a time, 50 ms each: at most 7 go out."""
    cfg = config(slow_server, mix=(("encode-text", 1.0),), duration_s=0.31, max_in_flight=1)
    report = run_load(cfg, [Step("open", 50)])

    (step,) = report.steps
    assert step.scheduled == 16
    assert step.completed <= 7
    assert step.dropped == step.scheduled - step.completed
    assert step.errors == {}


# --- the command ---------------------------------------------------------------------------


def test_command_json_and_plot(
    fake_server: ThreadedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(fake_server.address) as client:
        client.create_collection("cli", exist_ok=True)
    plot = tmp_path / "sweep.png"
    code = cli_main([
        "bench", "load", "--server", fake_server.address, "--mix", "encode-text=2,search-vector=1",
        "--collection", "cli", "--concurrency", "1,2", "--rate", "40", "--duration", "2",
        "--warmup", "0.1", "--max-requests", "6", "--json", "--plot", str(plot), "--no-progress",
    ])  # fmt: skip

    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["server"] == fake_server.address
    assert report["mix"] == {"encode-text": 2.0, "search-vector": 1.0}
    assert report["model"]["dim"] > 0
    assert report["ceiling"]["ok"] > 0 and report["ceiling"]["errors"] == {}
    assert [(s["mode"], s.get("concurrency"), s.get("rate")) for s in report["steps"]] == [
        ("closed", 1, None),
        ("closed", 2, None),
        ("open", None, 40),
    ]
    for step in report["steps"]:
        assert step["completed"] == 6
        assert step["ok"] + sum(step["errors"].values()) == 6
        assert sum(s["ok"] + s["errors"] for s in step["scenarios"].values()) == 6
        assert set(step["scenarios"]) <= {"encode-text", "search-vector"}
        assert set(step["latency_ms"]) == {"p50", "p95", "p99", "max", "mean"}
        assert set(step["server_ms"]) == {"queue", "preprocess", "inference", "search", "total"}
        assert {"throughput", "batch_size", "round_trip_ms", "dropped", "late"} <= set(step)
    assert "p50" in captured.err  # the tables go to stderr under --json
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (1200, 700)


def test_command_refuses_a_remote_server(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["bench", "load", "--server", "192.0.2.7:50051", "--duration", "1"])

    assert code == 2
    assert "not a loopback address" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("localhost:1", "localhost"),
        ("[::1]:50051", "::1"),
        ("ipv4:127.0.0.2:9", "127.0.0.2"),
        ("dns:///localhost:9", "localhost"),
        ("unix:/tmp/clipsearch.sock", None),
    ],
)
def test_loopback_addresses_pass(address: str, host: str | None) -> None:
    assert target_host(address) == host
    check_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.1:50051", "[2001:db8::1]:1", "8.8.8.8:53"])
def test_remote_addresses_are_refused(address: str) -> None:
    with pytest.raises(RemoteAddressError, match="not a loopback address"):
        check_loopback(address)


def test_parse_mix() -> None:
    assert LOAD_SCENARIOS == SCENARIOS
    assert parse_mix("search-text=3, ingest=1,encode-text") == (
        ("search-text", 3.0),
        ("ingest", 1.0),
        ("encode-text", 1.0),
    )
    for bad in ("nope=1", "ingest=0", "ingest=x", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_a_step_near_the_generators_ceiling_is_flagged_client_bound() -> None:
    def run(n: int, loop_cpu_s: float) -> StepRun:
        records = [Record("info", k / n, k / n, k / n + 0.001, "OK", None) for k in range(n)]
        return StepRun(Step("closed", 8), records, 0.0, n, 0, loop_cpu_s, 1.0)

    ceiling = summarize(run(1000, 0.5), None)
    assert round(ceiling.throughput) == 1000 and ceiling.client_bound == ""
    near = summarize(run(900, 0.5), ceiling)
    assert "90% of its own ceiling" in near.client_bound
    assert summarize(run(500, 0.5), ceiling).client_bound == ""
    assert "busy 95%" in summarize(run(500, 0.95), ceiling).client_bound


# --- the real model ------------------------------------------------------------------------


@pytest.mark.slow  # a `clipsearch serve` process on the demo model and Milvus Lite (~15 s)
def test_latency_preset_drives_a_real_server(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        ["bench", "latency", "--n", "40", "--seconds", "0.5", "--threads", "1", "4", "--json"]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["gallery"] == 40 and report["collection"] == "bench"
    assert report["model"]["name"] == "clipsearch-demo"
    assert [step["concurrency"] for step in report["steps"]] == [1, 4]
    for step in report["steps"]:
        assert step["ok"] > 0 and step["errors"] == {}
        assert step["server_ms"]["inference"] > 0 and step["server_ms"]["search"] > 0
        assert step["batch_size"] >= 1
        assert step["round_trip_ms"]["p50"] >= step["server_ms"]["total"] * 0.5
