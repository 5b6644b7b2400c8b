"""The consistency level of each read, so that reads see this process's own writes.

Session consistency makes Milvus wait until the last write pymilvus saw on a collection is
searchable. Milvus 2.3 answers Delete without a timestamp, so pymilvus does not move that
mark forward on a delete and a Session read right after one can still see the deleted item
(observed here with Milvus 2.3.5 and pymilvus 3.0.2). So after a delete, reads of that
collection use Strong until one Strong read has completed: from then on the server has
applied the delete and Session is enough again. A delete followed by a write to the same
collection needs none of this: the write's timestamp is later, and Session waits for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

SESSION = "Session"
STRONG = "Strong"


@dataclass(frozen=True)
class ReadLevel:
    level: str
    generation: int  # deletes on the collection when the read started


class ReadConsistency:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deletes: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}

    def deleted(self, collection: str) -> None:
        """Call after a delete on `collection` returned."""
        with self._lock:
            self._deletes[collection] = self._deletes.get(collection, 0) + 1

    def unsettled(self, collection: str) -> None:
        """Call when the server may not yet serve writes made before now (it restarted, and a
        reloaded collection answers from what it has replayed so far): reads of `collection`
        use Strong until one has completed, as after a delete."""
        self.deleted(collection)

    def level(self, collection: str) -> ReadLevel:
        with self._lock:
            generation = self._deletes.get(collection, 0)
            confirmed = self._confirmed.get(collection, 0)
        return ReadLevel(STRONG if generation > confirmed else SESSION, generation)

    def completed(self, collection: str, read: ReadLevel) -> None:
        """Call after a read at `read` succeeded."""
        if read.level != STRONG:
            return
        with self._lock:
            self._confirmed[collection] = max(self._confirmed.get(collection, 0), read.generation)

    def forget(self, collection: str) -> None:
        with self._lock:
            self._deletes.pop(collection, None)
            self._confirmed.pop(collection, None)
