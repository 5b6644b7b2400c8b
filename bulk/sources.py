"""The work list of a bulk run: one row per item to encode, read from SOURCE on the driver.

SOURCE is what `clipsearch ingest` reads (a directory of images, a CSV or JSONL manifest, one
image: `clipsearch.client.sources` parses them, so ids, uris, captions and metadata come out
exactly as ingest makes them), or Parquet (a `.parquet` file or a directory of `.parquet`
files) with the manifest's columns: `id`, `path` or `uri`, `caption` (or `--caption-field`),
`metadata` (a JSON object string), every other column into metadata, read by the Parquet
reader of `clipsearch ingest` (`clipsearch.client.parquet`); a row that carries its image
vector is not bulk's to encode and is reported failed.

Only paths travel, never image bytes: the encode actors read the files, so the driver holds a
few hundred bytes per item (about 300 MB per million items). A row that cannot describe an
item becomes a row with its `error` set, reported as a failed item like ingest reports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from clipsearch.client.parquet import is_parquet, parquet_rows
from clipsearch.client.sources import RowError, open_source, row_item
from clipsearch.client.types import IngestItem

ROWS_PER_TABLE = 10_000

# `label` names the item in messages (its id, else its path, else manifest:line); an empty
# `id` is replaced by the content hash of the image; a non-empty `error` is a failed item.
WORK_SCHEMA = pa.schema(
    [
        ("label", pa.string()),
        ("id", pa.string()),
        ("path", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("metadata", pa.string()),
        ("error", pa.string()),
    ]
)


def work_rows(
    source: str | os.PathLike[str], caption_field: str | None = None
) -> Iterator[dict[str, str]]:
    """The rows of `source` (see the module docstring). Raises SourceError when the source
    itself cannot be read; a bad row is yielded with its error."""
    if is_parquet(source):
        return _parquet_rows(Path(source), caption_field)
    return _item_rows(iter(open_source(source, caption_field=caption_field)))


def work_tables(
    rows: Iterable[dict[str, str]], rows_per_table: int = ROWS_PER_TABLE
) -> Iterator[pa.Table]:
    chunk: list[dict[str, str]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= rows_per_table:
            yield pa.Table.from_pylist(chunk, schema=WORK_SCHEMA)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=WORK_SCHEMA)


def _item_rows(items: Iterator[IngestItem]) -> Iterator[dict[str, str]]:
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except RowError as exc:
            yield _failed(exc.where, exc.reason)
            continue
        yield _row(item)


def _row(item: IngestItem) -> dict[str, str]:
    try:
        metadata = json.dumps(item.metadata, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return _failed(item.label, f"metadata is not JSON: {exc}")
    return {
        "label": item.label,
        "id": item.id,
        "path": str(item.path),
        "uri": item.uri,
        "caption": item.caption,
        "metadata": metadata,
        "error": "",
    }


def _failed(label: str, reason: str) -> dict[str, str]:
    return {
        "label": label,
        "id": "",
        "path": "",
        "uri": "",
        "caption": "",
        "metadata": "{}",
        "error": reason,
    }


def _parquet_rows(path: Path, caption_field: str | None) -> Iterator[dict[str, str]]:
    for row in parquet_rows(path, caption_field):
        if isinstance(row, RowError):
            yield _failed(row.where, row.reason)
        elif row.image_vector is not None:
            yield _failed(row.where, "the row carries its image vector: `clipsearch ingest` it")
        else:
            try:
                item = row_item(row.record, row.base, caption_field, row.where)
            except RowError as exc:
                yield _failed(exc.where, exc.reason)
                continue
            yield _row(item)
