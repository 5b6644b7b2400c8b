"""Milvus Lite database files opened by this process.

Each `.db` path gets one in-process Milvus Lite server, on a unix socket in a private
directory (not pymilvus's loopback TCP port, which any local user could reach). Stores
count their users of each path here, and the last one to close stops that server: the
file's lock is released and a store opened later reads the data back from disk, as a
restarted service would.

Milvus Lite 3.2 keeps new rows in a memtable until it holds 128 MiB, and every search
converts each memtable row to Python objects: about 0.1 ms per 512-d row, so 10k unflushed
rows cost a second per search (and per count) while the same rows flushed to a segment
search in tens of milliseconds. So the store flushes a collection every 8192 rows written
to it, and flushes the rest once the collection has had no write for a second
(`MemtableFlusher`). Flushing is not free: each flush writes a segment and queues a
compaction and an index build on Lite's background thread, in this process, whose cost
grows with the collection; flushing every 1024 rows made a 4,096-item bulk load 9x slower
than no flush at all (docs/BENCHMARKS.md, "Streaming ingest"). 8192 bounds a search during
a bulk load at about a second and leaves ingest close to Lite's raw rate.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc

from clipsearch.server.errors import ConfigurationError, Unavailable

FLUSH_EVERY_ROWS = 8192
IDLE_FLUSH_S = 1.0
LITE_SERVER_THREADS = 10  # as milvus_lite's own launcher
LITE_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# pymilvus pings every 10 s, also while no call is open; gRPC's default lets a server take
# one ping per 5 minutes without data, then it drops the connection ("too_many_pings"),
# which broke any call longer than ~30 s (an index build at 100k rows) and made pymilvus
# retry it.
LITE_MIN_PING_INTERVAL_MS = 5_000

log = logging.getLogger(__name__)


class _LiteServer:
    """One Milvus Lite database served over gRPC on a unix socket only this user can open.

    pymilvus's own launcher (`milvus_lite.server_manager`) listens on a loopback TCP port,
    which every local user can reach and which has no authentication: anyone on the machine
    could list, read and drop collections behind the server's back, whatever its token. A
    socket in a fresh 0700 directory is reachable by this user (and root) only."""

    def __init__(self, path: Path) -> None:
        # Imported only where Lite is used; a server-only deployment never loads it.
        from milvus_lite import MilvusLite  # noqa: PLC0415
        from milvus_lite.adapter.grpc.servicer import MilvusServicer  # noqa: PLC0415
        from pymilvus.grpc_gen import milvus_pb2_grpc  # noqa: PLC0415

        self.db = MilvusLite(str(path))
        self.directory = Path(tempfile.mkdtemp(prefix="clipsearch-lite-"))  # mode 0700
        socket_path = self.directory / "milvus.sock"
        self.uri = f"unix:{socket_path}"
        self.server = grpc.server(
            futures.ThreadPoolExecutor(LITE_SERVER_THREADS, thread_name_prefix="milvus-lite"),
            options=[
                ("grpc.max_receive_message_length", LITE_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", LITE_MAX_MESSAGE_BYTES),
                ("grpc.http2.min_ping_interval_without_data_ms", LITE_MIN_PING_INTERVAL_MS),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(self.db), self.server)
        try:
            if self.server.add_insecure_port(self.uri) == 0:
                raise OSError(f"cannot listen on {self.uri}")
            socket_path.chmod(0o600)
            self.server.start()
        except BaseException:
            self.close()
            raise
        log.info("Milvus Lite %s served on %s (only this user can connect)", path, self.uri)

    def close(self) -> None:
        try:
            self.server.stop(grace=2).wait()
        finally:
            self.db.close()
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class LiteDatabase:
    """A user of one Milvus Lite file; `uri` is where pymilvus reaches it."""

    path: Path
    uri: str
    _released: bool = False

    _servers: ClassVar[dict[Path, tuple[_LiteServer, int]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def open(cls, uri: str) -> LiteDatabase:
        path = Path(uri).expanduser().resolve()
        if path.suffix != ".db":
            raise ConfigurationError(
                f"milvus_uri {uri!r}: a Milvus Lite database is a path ending in .db "
                "(or give http://host:19530 for a Milvus server)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        with cls._lock:
            server, users = cls._servers.get(path, (None, 0))
            if server is None:
                try:
                    server = _LiteServer(path)
                except Exception as exc:
                    raise Unavailable(
                        f"cannot open Milvus Lite at {path}: {exc} "
                        "(is another process using this file?)"
                    ) from exc
                if not cls._servers:
                    atexit.register(cls._close_all)
            cls._servers[path] = (server, users + 1)
        return cls(path, server.uri)

    @classmethod
    def endpoint(cls, uri: str) -> str:
        """The `unix:` URI of a database this process has open: other pymilvus clients in
        this process reach it there (a second `MilvusClient(path)` would try to lock the
        file again)."""
        with cls._lock:
            server, _ = cls._servers[Path(uri).expanduser().resolve()]
        return server.uri

    def release(self) -> None:
        """The last user of a file stops its server: the file's lock is released and a store
        opened later reads the data back from disk, as a restarted service would."""
        if self._released:
            return
        self._released = True
        with self._lock:  # held while closing, so a new open waits for the file's lock
            server, users = self._servers.pop(self.path)
            if users > 1:
                self._servers[self.path] = (server, users - 1)
                return
            server.close()

    @classmethod
    def _close_all(cls) -> None:
        with cls._lock:
            servers, cls._servers = [server for server, _ in cls._servers.values()], {}
        for server in servers:
            try:
                server.close()
            except Exception as exc:  # at exit: close the others all the same
                log.warning("closing Milvus Lite at exit: %s", exc)


class MemtableFlusher:
    """When to flush a Milvus Lite collection's memtable.

    The writer asks `written()` after each write and flushes at once when it says so (every
    `every_rows` rows). What is left below that is flushed by a background thread once the
    collection has had no write for `idle_s`, through `flush_idle(collection)`, which must
    take the store's write lock and call `flushed()`.
    """

    def __init__(
        self,
        flush_idle: Callable[[str], None],
        every_rows: int = FLUSH_EVERY_ROWS,
        idle_s: float = IDLE_FLUSH_S,
    ) -> None:
        self._flush_idle = flush_idle
        self._every_rows = every_rows
        self._idle_s = idle_s
        self._wakeup = threading.Condition()
        self._unflushed: dict[str, int] = {}
        self._last_write: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False

    def written(self, collection: str, rows: int) -> bool:
        """Count `rows` just written to `collection`; True: flush it now."""
        with self._wakeup:
            unflushed = self._unflushed.get(collection, 0) + rows
            self._unflushed[collection] = unflushed
            self._last_write[collection] = time.monotonic()
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(
                    target=self._run, name="milvus-lite-flusher", daemon=True
                )
                self._thread.start()
            self._wakeup.notify()
        return unflushed >= self._every_rows

    def flushed(self, collection: str) -> None:
        with self._wakeup:
            self._unflushed.pop(collection, None)
            self._last_write.pop(collection, None)

    def close(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _due(self) -> tuple[list[str], float]:
        """Collections idle long enough to flush now, and how long to sleep otherwise."""
        now = time.monotonic()
        due, sleep = [], self._idle_s
        for collection, last in self._last_write.items():
            idle_for = now - last
            if idle_for >= self._idle_s:
                due.append(collection)
            else:
                sleep = min(sleep, self._idle_s - idle_for)
        return due, sleep

    def _run(self) -> None:
        while True:
            with self._wakeup:
                if self._stopped:
                    return
                due, sleep = self._due()
                if not due:
                    self._wakeup.wait(timeout=sleep if self._last_write else None)
                    continue
            for collection in due:
                try:
                    self._flush_idle(collection)
                except Exception as exc:  # a dropped collection, a closing store: try no more
                    log.debug("idle flush of %s failed: %s", collection, exc)
                    self.flushed(collection)
