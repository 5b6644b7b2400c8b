"""Where a bulk run's encoded rows go: Milvus through the server's own store, or Parquet.

`MilvusSink` upserts through `MilvusStore`, the class the server uses: the same schema, the
same companion caption collection, the same ids and validation, so a collection written by
`clipsearch bulk` is searched by the server exactly like one written by ingest. An upsert
replaces by id, so a rerun after a failure converges to one row per item; a batch whose
upsert fails for a reason worth retrying (Milvus unavailable) is retried, then reported as
failed items.

`ParquetSink` writes the files Milvus bulk insert takes, one folder per Milvus collection:
`DIR/C/part-*.parquet` (`id`, `uri`, `caption`, `metadata` as a JSON string,
`image_vector` as a list of float32) and `DIR/C__captions/part-*.parquet` (the same with
`caption_vector`, for the items that have a caption). Bulk insert inserts, it does not
upsert, so an id seen twice in one run is written once (its first row) and the files are
meant for a new, empty collection (see docs/DEPLOY.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipsearch.bulk.encode import CAPTION_VECTOR, IMAGE_VECTOR
from clipsearch.bulk.existing import ExistingIds
from clipsearch.server.errors import ClipsearchError, Overloaded, Unavailable
from clipsearch.server.store import MilvusStore, StoredItem
from clipsearch.server.store.validation import COMPANION_SUFFIX

UPSERT_ATTEMPTS = 4
FIRST_RETRY_DELAY_S = 1.0
ROWS_PER_PARQUET_FILE = 100_000


@dataclass
class BatchOutcome:
    ok: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)


class Sink(Protocol):
    def write(self, batch: pa.Table) -> BatchOutcome: ...

    def close(self) -> None: ...


def _split(batch: pa.Table) -> tuple[list[int], BatchOutcome]:
    """Indexes of the rows that were encoded; the failed ones are already in the outcome."""
    outcome = BatchOutcome()
    good = []
    for index, (label, error) in enumerate(
        zip(batch["label"].to_pylist(), batch["error"].to_pylist(), strict=True)
    ):
        if error:
            outcome.failed.append((label, error))
        else:
            good.append(index)
    return good, outcome


class MilvusSink:
    def __init__(
        self, store: MilvusStore, collection: str, existing: ExistingIds | None = None
    ) -> None:
        """`existing`: skip items whose id is already stored (`--skip-existing`)."""
        self.store = store
        self.collection = collection
        self.existing = existing

    def write(self, batch: pa.Table) -> BatchOutcome:
        good, outcome = _split(batch)
        columns = {name: batch[name].to_pylist() for name in ("id", "uri", "caption", "metadata")}
        images = batch[IMAGE_VECTOR].to_pylist()
        captions = batch[CAPTION_VECTOR].to_pylist()
        items = [
            StoredItem(
                id=columns["id"][i],
                uri=columns["uri"][i],
                caption=columns["caption"][i],
                metadata=json.loads(columns["metadata"][i]),
                image_vector=np.asarray(images[i], np.float32),
                caption_vector=None if captions[i] is None else np.asarray(captions[i], np.float32),
            )
            for i in good
        ]
        if self.existing is not None and items:
            # Items that had no id before their image was hashed (ids known up front were
            # filtered before encoding).
            existing = self.existing(self.collection, [item.id for item in items])
            outcome.skipped += sum(1 for item in items if item.id in existing)
            items = [item for item in items if item.id not in existing]
        if items:
            error = self._upsert(items)
            if error is None:
                outcome.ok += len(items)
            else:
                outcome.failed += [(item.id, error) for item in items]
        return outcome

    def _upsert(self, items: list[StoredItem]) -> str | None:
        """Upsert (retrying what is worth retrying); the reason it failed, or None."""
        delay = FIRST_RETRY_DELAY_S
        for attempt in range(1, UPSERT_ATTEMPTS + 1):
            try:
                self.store.upsert(self.collection, items)
                return None
            except (Unavailable, Overloaded) as exc:
                if attempt == UPSERT_ATTEMPTS:
                    return f"write failed after {attempt} attempts: {exc}"
                time.sleep(delay)
                delay *= 2
            except ClipsearchError as exc:
                return f"write failed: {exc}"
        return None  # unreachable: the last attempt returns

    def close(self) -> None:
        if self.existing is not None:
            self.existing.close()
        self.store.close()


class ParquetSink:
    def __init__(
        self, out: Path, collection: str, rows_per_file: int = ROWS_PER_PARQUET_FILE
    ) -> None:
        self.images = _RollingWriter(out / collection, IMAGE_VECTOR, rows_per_file)
        self.captions = _RollingWriter(
            out / (collection + COMPANION_SUFFIX), CAPTION_VECTOR, rows_per_file
        )
        self._seen: set[str] = set()

    def write(self, batch: pa.Table) -> BatchOutcome:
        good, outcome = _split(batch)
        ids = batch["id"].to_pylist()
        fresh = []
        for i in good:
            if ids[i] not in self._seen:
                self._seen.add(ids[i])
                fresh.append(i)
        outcome.ok += len(good)
        rows = batch.take(pa.array(fresh, pa.int64()))
        self.images.write(rows.select(["id", "uri", "caption", "metadata", IMAGE_VECTOR]))
        captioned = rows.filter(pc.is_valid(rows[CAPTION_VECTOR]))
        self.captions.write(captioned.select(["id", "uri", "caption", "metadata", CAPTION_VECTOR]))
        return outcome

    def close(self) -> None:
        self.images.close()
        self.captions.close()

    @property
    def files(self) -> list[Path]:
        return [*self.images.files, *self.captions.files]


class _RollingWriter:
    """Parquet files of at most `rows_per_file` rows each in `folder`."""

    def __init__(self, folder: Path, vector_field: str, rows_per_file: int) -> None:
        self.folder = folder
        self.rows_per_file = rows_per_file
        self.schema = pa.schema(
            [
                ("id", pa.string()),
                ("uri", pa.string()),
                ("caption", pa.string()),
                ("metadata", pa.string()),
                (vector_field, pa.list_(pa.float32())),
            ]
        )
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._rows >= self.rows_per_file:
                self._roll()
            assert self._writer is not None
            take = min(self.rows_per_file - self._rows, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, take).cast(self.schema))
            self._rows += take
            offset += take

    def _roll(self) -> None:
        self.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema)
        self.files.append(path)
        self._rows = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
