"""The work list of a bulk run: one row per item to encode, read from SOURCE on the driver.

SOURCE is what `clipsearch ingest` reads (a directory of images, a CSV or JSONL manifest, one
image: `clipsearch.client.sources` parses them, so ids, uris, captions and metadata come out
exactly as ingest makes them), or Parquet (a `.parquet` file or a directory of `.parquet`
files) with the manifest's columns: `id`, `path` or `uri`, `caption` (or `--caption-field`),
`metadata` (a JSON object string), every other column into metadata.

Only paths travel, never image bytes: the encode actors read the files, so the driver holds a
few hundred bytes per item (about 300 MB per million items). A row that cannot describe an
item becomes a row with its `error` set, reported as a failed item like ingest reports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch.client.sources import RowError, SourceError, open_source, row_item
from clipsearch.client.types import IngestItem

PARQUET_SUFFIX = ".parquet"
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


def is_parquet(source: str | os.PathLike[str]) -> bool:
    return Path(source).suffix.lower() == PARQUET_SUFFIX


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
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{PARQUET_SUFFIX}") if p.is_file())
        base = path
    elif path.is_file():
        files, base = [path], path.parent
    else:
        raise SourceError(f"{path}: no such file or directory")
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{file}: not a readable Parquet file: {exc}") from exc
        columns = parquet.schema_arrow.names
        if caption_field is not None and caption_field not in columns:
            raise SourceError(
                f"{file}: no column {caption_field!r} (columns: {', '.join(columns)})"
            )
        line = 0
        for batch in parquet.iter_batches():
            for record in batch.to_pylist():
                line += 1
                where = f"{file}:{line}"
                try:
                    item = row_item(_parsed_metadata(record, where), base, caption_field, where)
                except RowError as exc:
                    yield _failed(exc.where, exc.reason)
                    continue
                yield _row(item)


def _parsed_metadata(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A Parquet row whose `metadata` JSON string is parsed (row_item wants an object)."""
    raw = record.get("metadata")
    if not isinstance(raw, str) or not raw:
        return record
    try:
        return {**record, "metadata": json.loads(raw)}
    except json.JSONDecodeError as exc:
        raise RowError(where, f"metadata is not valid JSON: {exc.msg}") from None
