"""Milvus Lite database files opened by this process.

pymilvus starts one in-process Milvus Lite server per `.db` path and keeps it (and the
file's lock) until the process exits. Stores count their users of each path here, and the
last one to close stops that server: the file's lock is released and a store opened later
reads the data back from disk, as a restarted service would.

Milvus Lite 3.2 keeps new rows in a memtable until it holds 128 MiB, and every search
converts each memtable row to Python objects: about 0.1 ms per 512-d row, so 10k unflushed
rows cost a second per search (and per count) while the same rows flushed to a segment
search in tens of milliseconds. So the store flushes a collection every 1024 rows written
to it, and flushes the rest once the collection has had no write for a second
(`MemtableFlusher`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from clipsearch.server.errors import ConfigurationError

FLUSH_EVERY_ROWS = 1024
IDLE_FLUSH_S = 1.0

log = logging.getLogger(__name__)


@dataclass
class LiteDatabase:
    path: Path
    _released: bool = False

    _users: ClassVar[dict[Path, int]] = {}
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
            cls._users[path] = cls._users.get(path, 0) + 1
        return cls(path)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with self._lock:
            users = self._users.get(self.path, 1) - 1
            if users > 0:
                self._users[self.path] = users
                return
            self._users.pop(self.path, None)
            # Imported only where Lite is used; a server-only deployment never loads it.
            from milvus_lite.server_manager import server_manager_instance  # noqa: PLC0415

            server_manager_instance.release_server(str(self.path))


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
