"""Which ids a collection already holds, as of now: the `--skip-existing` check.

`MilvusStore.existing_ids` reads at Session consistency: it sees this process's writes, but
a delete made by another process (a clipsearch server, an operator) can stay invisible for a
while, and a resumed run would then skip items that are gone. So on a Milvus server the check
reads at Strong consistency through its own pymilvus client (one query per 1000 ids, about
0.2 s each on Milvus 2.3). Milvus Lite applies every write before acknowledging it, so there
the store's own check is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymilvus import MilvusClient

from clipsearch.server.store import MilvusStore, expressions, milvus_errors

TIMEOUT_S = 60.0


class ExistingIds:
    def __init__(self, store: MilvusStore, uri: str, token: str = "") -> None:
        self.store = store
        self._client: Any = (
            MilvusClient(uri=uri, token=token, timeout=TIMEOUT_S) if "://" in uri else None
        )

    def __call__(self, collection: str, ids: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(ids))
        if self._client is None:
            found: set[str] = set()
            for chunk in expressions.chunks(unique):
                found |= self.store.existing_ids(collection, chunk)
            return found
        found = set()
        for chunk in expressions.chunks(unique):
            try:
                rows = self._client.query(
                    collection,
                    filter=expressions.ids_in(chunk),
                    output_fields=["id"],
                    consistency_level="Strong",
                    timeout=TIMEOUT_S,
                )
            except Exception as exc:
                raise milvus_errors.translate(exc, collection) from exc
            found |= {row["id"] for row in rows}
        return found

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
