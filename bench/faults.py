"""`clipsearch bench faults --scenario NAME`: fault trials that print exact counts.

Each scenario runs real processes on loopback: `clipsearch serve` (the demo model), Milvus
Lite or a real Milvus 2.3 server (`milvus-server`), and the Python client's resumable ingest
of generated items, then breaks something mid-ingest and counts what the client was told
against what the store holds:

- `lite-kill9`: kill -9 of the clipsearch server (Milvus Lite) mid-ingest, restart on the
  same port and file: every item acked before the kill is still there, the client resumes.
- `milvus-kill9`: the same with a Milvus server as the store.
- `milvus-restart`: kill -9 of the Milvus server mid-ingest and a restart on the same
  ports and data: ingest holds and retries, the client resumes, health goes NOT_SERVING and
  back to SERVING by itself.
- `drain`: SIGTERM mid-ingest (grace 2 s), restart after 5 s on the same port and file:
  the draining server ends the streams UNAVAILABLE and the client's resume waits for it.
- `disk-full`: Milvus Lite on a 2 MiB tmpfs (needs root to mount): acked items are all
  visible, nothing acked FAILED is stored, the stream ends RESOURCE_EXHAUSTED "disk full"
  and health is NOT_SERVING.

A scenario passes when the counts are exact (`ok` is true); the exit code says so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from clipsearch.bench.commands import FAULT_SCENARIOS
from clipsearch.bench.milvus_server import (
    MilvusServerProcess,
    free_port,
    required_milvus_server_executable,
)
from clipsearch.client import Backoff, Client, ClipsearchError, IngestItem, IngestResult
from clipsearch.server.process import ServerProcess

COLLECTION = "faults"
SCENARIOS = FAULT_SCENARIOS
GET_CHUNK = 256
WAIT_S = 300.0  # the longest any client run may take before the scenario fails


def make_items(n: int, seed: int = 0) -> list[IngestItem]:
    """`n` distinct small JPEGs with ids `item-00000`...; every other one has a caption."""
    items = []
    for k in range(n):
        colour = ((k * 37 + seed) % 256, (k * 91) % 256, (k * 13 + k // 256) % 256)
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, "JPEG", quality=90)
        caption = f"item {k} colour {colour}" if k % 2 == 0 else ""
        items.append(IngestItem(id=f"item-{k:05d}", image=buffer.getvalue(), caption=caption))
    return items


class BackgroundIngest:
    """A client ingest of `items` in a thread; `on_ack(results_so_far)` after each result."""

    def __init__(
        self,
        address: str,
        items: list[IngestItem],
        *,
        collection: str = COLLECTION,
        window: int = 32,
        backoff: Backoff | None = None,
        max_attempts: int | None = None,
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        self.address = address
        self.items = items
        self.collection = collection
        self.window = window
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.on_ack = on_ack
        self.results: list[IngestResult] = []
        self.error: BaseException | None = None
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="bench-ingest", daemon=True)

    def start(self) -> BackgroundIngest:
        self._thread.start()
        return self

    def wait(self, timeout_s: float = WAIT_S) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the ingest did not end within {timeout_s:.0f} s")

    def _run(self) -> None:
        try:
            with Client(self.address, timeout=60) as client:
                stream = client.ingest(
                    self.items,
                    collection=self.collection,
                    window=self.window,
                    backoff=self.backoff,
                    max_attempts=self.max_attempts,
                )
                try:
                    for result in stream:
                        self.results.append(result)
                        if self.on_ack is not None:
                            self.on_ack(len(self.results))
                finally:
                    self.reconnects = stream.reconnects
        except BaseException as exc:  # reported in the counts
            self.error = exc

    def ids(self, status: str) -> list[str]:
        return [r.id for r in self.results if r.status == status]

    @property
    def duplicates(self) -> int:
        """Items reported more than once."""
        return sum(n - 1 for n in Counter(r.seq for r in self.results).values() if n > 1)


def health_status(address: str, timeout_s: float = 1.0) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class HealthWatch:
    """Polls health every `interval_s` in a thread and keeps each change of status."""

    def __init__(self, address: str, interval_s: float = 0.1) -> None:
        self.address = address
        self.interval_s = interval_s
        self.changes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="bench-health", daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            status = health_status(self.address)
            if not self.changes or self.changes[-1][1] != status:
                self.changes.append((round(time.monotonic() - self._started, 1), status))

    def now(self) -> float:
        """Seconds since the watch started, the clock of `changes`."""
        return round(time.monotonic() - self._started, 1)

    def saw(self, *sequence: str) -> bool:
        """Whether the statuses went through `sequence` in this order."""
        statuses = iter(status for _, status in self.changes)
        return all(any(s == wanted for s in statuses) for wanted in sequence)

    def wait_for(self, status: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.changes and self.changes[-1][1] == status:
                return True
            time.sleep(self.interval_s)
        return False


def stored_ids(client: Client, ids: list[str], collection: str = COLLECTION) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), GET_CHUNK):
        found |= {item.id for item in client.get(ids[i : i + GET_CHUNK], collection=collection)}
    return found


def store_counts(
    address: str, ingest: BackgroundIngest, acked_before: list[str] | None = None
) -> dict[str, Any]:
    """What the client was told against what the store holds."""
    ok, failed = ingest.ids("ok"), ingest.ids("failed")
    with Client(address, timeout=120) as client:
        visible = stored_ids(client, ok)
        failed_stored = stored_ids(client, failed)
        before = stored_ids(client, acked_before) if acked_before is not None else set()
        counts: dict[str, Any] = {
            "items": len(ingest.items),
            "acked_ok": len(ok),
            "acked_failed": len(failed),
            "duplicate_acks": ingest.duplicates,
            "reconnects": ingest.reconnects,
            "stored": client.count(collection=COLLECTION),
            "acked_ok_missing": len(ok) - len(visible),
            "failed_but_stored": len(failed_stored),
            "client_error": _describe(ingest.error),
        }
    if acked_before is not None:
        counts["acked_before_fault"] = len(acked_before)
        counts["acked_before_fault_missing"] = len(acked_before) - len(before)
    return counts


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    code = getattr(error, "code", None)
    name = getattr(code, "name", "")
    return f"{name}: {error}" if name else f"{type(error).__name__}: {error}"


def _exact(counts: dict[str, Any]) -> bool:
    """Every item written exactly once, each acked once, none failed, nothing lost."""
    return (
        counts["acked_ok"] == counts["items"] == counts["stored"]
        and counts["acked_failed"] == 0
        and counts["duplicate_acks"] == 0
        and counts["acked_ok_missing"] == 0
        and counts.get("acked_before_fault_missing", 0) == 0
        and not counts["client_error"]
    )


class ChildServer(ServerProcess):
    """A `clipsearch serve` child that can be signalled and waited for."""

    @property
    def pid(self) -> int:
        assert self._process is not None, "not running"
        return self._process.pid

    def signal(self, sig: signal.Signals) -> None:
        if self._process is not None:
            self._process.send_signal(sig)

    def wait_exit(self, timeout_s: float = 60.0) -> tuple[int, float]:
        """The exit code and the seconds it took."""
        started = time.monotonic()
        process, self._process = self._process, None
        assert process is not None
        code = process.wait(timeout_s)
        return code, round(time.monotonic() - started, 2)


def _server(port: int, store: str, *extra: str) -> ChildServer:
    args = ["--port", str(port), "--milvus-uri", store, "--log-level", "warning", *extra]
    return ChildServer(args)


@contextlib.contextmanager
def _milvus(work: Path) -> Iterator[MilvusServerProcess]:
    executable = required_milvus_server_executable()
    server = MilvusServerProcess(work / "milvus", executable)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def at_acks(count: int, action: Callable[[], None]) -> Callable[[int], None]:
    """An on_ack callback that runs `action` once, in its own thread, at `count` acks."""
    fired = threading.Event()

    def on_ack(acks: int) -> None:
        if acks >= count and not fired.is_set():
            fired.set()
            threading.Thread(target=action, daemon=True).start()

    return on_ack


def kill9_server(work: Path, n: int, store: str) -> dict[str, Any]:
    """kill -9 of `clipsearch serve` at n/3 acks; restart on the same port and store."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = _server(port, store)
    server.start()
    killed = threading.Event()
    acked_before: list[str] = []
    ingest = BackgroundIngest(address, make_items(n))

    def kill() -> None:
        server.signal(signal.SIGKILL)
        acked_before.extend(ingest.ids("ok"))  # acks read before the kill landed
        killed.set()

    ingest.on_ack = at_acks(n // 3, kill)
    ingest.start()
    if not killed.wait(WAIT_S):
        raise TimeoutError("the ingest did not reach the kill point")
    exit_code, _ = server.wait_exit()
    restarted = _server(port, store)
    restarted.start()
    try:
        ingest.wait()
        counts = store_counts(address, ingest, acked_before)
    finally:
        restarted.stop()
    counts["server_exit_code"] = exit_code
    counts["ok"] = _exact(counts)
    return counts


def lite_kill9(work: Path, n: int) -> dict[str, Any]:
    return kill9_server(work, n, str(work / "lite.db"))


def milvus_kill9(work: Path, n: int) -> dict[str, Any]:
    with _milvus(work) as milvus:
        return kill9_server(work, n, milvus.uri)


def milvus_restart(work: Path, n: int) -> dict[str, Any]:
    """kill -9 of Milvus at n/3 acks; restart it once health says NOT_SERVING."""
    with _milvus(work) as milvus:
        port = free_port()
        address = f"127.0.0.1:{port}"
        server = _server(port, milvus.uri, "--store-probe-s", "0.5", "--store-retry-s", "10")
        server.start()
        killed = threading.Event()
        times: dict[str, float] = {}
        try:
            with HealthWatch(address) as health:

                def kill() -> None:
                    milvus.kill()
                    times["killed_at_s"] = health.now()
                    killed.set()

                ingest = BackgroundIngest(address, make_items(n), on_ack=at_acks(n // 3, kill))
                ingest.start()
                if not killed.wait(WAIT_S):
                    raise TimeoutError("the ingest did not reach the kill point")
                saw_down = health.wait_for("NOT_SERVING", 30)
                times["restart_at_s"] = health.now()
                milvus.start(timeout_s=240)
                times["milvus_ready_at_s"] = health.now()
                back = health.wait_for("SERVING", 120)
                times["serving_at_s"] = health.now()
                with Client(address, timeout=120) as client:
                    started = time.monotonic()
                    client.search("item 1", collection=COLLECTION, top_k=5)
                    times["first_search_s"] = round(time.monotonic() - started, 2)
                ingest.wait()
                times["ingest_done_at_s"] = health.now()
                counts = store_counts(address, ingest)
            counts.update(times)
            restart_s = times["milvus_ready_at_s"] - times["restart_at_s"]
            counts["milvus_restart_s"] = round(restart_s, 1)
            counts["health"] = [f"{t}s {status}" for t, status in health.changes]
            counts["ok"] = _exact(counts) and saw_down and back
        finally:
            server.stop()
    return counts


def drain(work: Path, n: int) -> dict[str, Any]:
    """SIGTERM at n/3 acks (grace 2 s); restart 5 s after the server exited."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    store = str(work / "drain.db")
    server = _server(port, store, "--grace-period-s", "2")
    server.start()
    signalled = threading.Event()
    ingest = BackgroundIngest(address, make_items(n))

    def terminate() -> None:
        server.signal(signal.SIGTERM)
        signalled.set()

    ingest.on_ack = at_acks(n // 3, terminate)
    ingest.start()
    if not signalled.wait(WAIT_S):
        raise TimeoutError("the ingest did not reach the SIGTERM")
    exit_code, drain_s = server.wait_exit()
    time.sleep(5.0)  # the server is down: the client's resume must wait this out
    restarted = _server(port, store)
    restarted.start()
    try:
        ingest.wait()
        counts = store_counts(address, ingest)
    finally:
        restarted.stop()
    counts.update(server_exit_code=exit_code, drain_s=drain_s)
    counts["ok"] = _exact(counts) and exit_code == 0
    return counts


@contextlib.contextmanager
def tiny_filesystem(directory: Path, size: str = "2m") -> Iterator[Path]:
    """A `size` tmpfs mounted on `directory` (root only), unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise PermissionError(
            f"cannot mount a {size} tmpfs on {directory} (root needed): "
            f"{mounted.stderr.strip() or mounted.returncode}"
        )
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def disk_full(work: Path, n: int) -> dict[str, Any]:
    with tiny_filesystem(work / "tiny") as tiny:
        port = free_port()
        address = f"127.0.0.1:{port}"
        server = _server(port, str(tiny / "full.db"), "--store-probe-s", "0.5")
        server.start()
        try:
            ingest = BackgroundIngest(address, make_items(n)).start()
            ingest.wait()
            time.sleep(2.0)  # past the idle flush (1 s): acked rows must stay readable
            counts = store_counts(address, ingest)
            counts["health"] = health_status(address)
            counts["disk_free_bytes"] = shutil.disk_usage(tiny).free
        finally:
            server.stop()
    error = ingest.error
    counts["ok"] = (
        counts["acked_ok"] > 0
        and counts["acked_ok_missing"] == 0
        and counts["failed_but_stored"] == 0
        and counts["stored"] >= counts["acked_ok"]
        and isinstance(error, ClipsearchError)
        and error.code.name == "RESOURCE_EXHAUSTED"
        and "disk full" in error.message
        and counts["health"] == "NOT_SERVING"
    )
    return counts


RUNNERS: dict[str, Callable[[Path, int], dict[str, Any]]] = {
    "lite-kill9": lite_kill9,
    "milvus-kill9": milvus_kill9,
    "milvus-restart": milvus_restart,
    "drain": drain,
    "disk-full": disk_full,
}
DEFAULT_ITEMS = {"disk-full": 4000}


def main(args: argparse.Namespace) -> int:
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    reports = {}
    for name in scenarios:
        work = Path(tempfile.mkdtemp(prefix=f"clipsearch-faults-{name}-"))
        n = args.items or DEFAULT_ITEMS.get(name, 1500)
        started = time.monotonic()
        try:
            counts = RUNNERS[name](work, n)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        counts["seconds"] = round(time.monotonic() - started, 1)
        reports[name] = counts
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()), file=sys.stderr)
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0 if all(r["ok"] for r in reports.values()) else 1
