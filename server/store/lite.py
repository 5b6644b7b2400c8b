"""Milvus Lite database files opened by this process.

pymilvus starts one in-process Milvus Lite server per `.db` path and keeps it (and the
file's lock) until the process exits. Stores count their users of each path here, and the
last one to close stops that server: the file's lock is released and a store opened later
reads the data back from disk, as a restarted service would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from clipsearch.server.errors import ConfigurationError


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
