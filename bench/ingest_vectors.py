"""`clipsearch bench ingest-vectors`: vectors computed elsewhere, from Parquet into the store.

Writes N rows of the documented Parquet layout (`id`, `uri`, `caption`, `metadata` as a JSON
string, `image_vector` and `caption_vector`: random unit float32 vectors of the served
model's dimension, the model id in the schema metadata), then, in one run, with the same file:
  - the reader alone: `open_source(FILE)` iterated to the end (the client's Parquet cost);
  - `clipsearch ingest FILE.parquet`'s code path (`Client.ingest_path`) into Milvus Lite
    (the server's own file) and into a Milvus server started for the run, each into a
    collection created before the clock starts; the run checks Count == N, that the
    towers encoded nothing (the batchers' item counters), and that Search(vector) finds a
    few rows first with score 1;
  - the store's own limit: bare pymilvus upserts of the same number of rows (an image row
    and a caption row per item, `clipsearch.bench.ingest.raw_upsert_rate`).
Prints items/s of each and `ingest_vs_raw_lite` / `ingest_vs_raw_server`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch.bench.ingest import raw_upsert_rate
from clipsearch.bench.milvus_server import MilvusServerProcess, required_milvus_server_executable
from clipsearch.bench.report import print_report, ratio, rounded
from clipsearch.client import Client
from clipsearch.client.parquet import vectors_schema
from clipsearch.client.sources import open_source
from clipsearch.server.process import ServerProcess

COLLECTION = "bench_vectors"
ROWS_PER_GROUP = 10_000
CHECKED_ROWS = (0, 1, -1)
SEED = 7
RESULT_KEYS = (
    "items",
    "dim",
    "parquet_read_items_per_s",
    "ingest_lite_items_per_s",
    "ingest_server_items_per_s",
    "raw_upsert_lite_items_per_s",
    "raw_upsert_server_items_per_s",
    "ingest_vs_raw_lite",
    "ingest_vs_raw_server",
)


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def write_vectors_parquet(path: Path, count: int, dim: int, model_id: str) -> np.ndarray:
    """The benchmark's file; returns its image vectors (to check searches against)."""
    images = unit_vectors(count, dim, SEED)
    captions = unit_vectors(count, dim, SEED + 1)
    schema = vectors_schema(model_id)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, count, ROWS_PER_GROUP):
            stop = min(start + ROWS_PER_GROUP, count)
            n = stop - start
            columns = [
                pa.array([f"vec-{i:07d}" for i in range(start, stop)]),
                pa.array([f"s3://bench/{i:07d}.jpg" for i in range(start, stop)]),
                pa.array([f"a photo number {i}" for i in range(start, stop)]),
                pa.array([json.dumps({"n": i, "even": i % 2 == 0}) for i in range(start, stop)]),
                _vector_column(images[start:stop], n, dim),
                _vector_column(captions[start:stop], n, dim),
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return images


def _vector_column(rows: np.ndarray, n: int, dim: int) -> pa.Array:
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))


def read_rate(path: Path) -> float:
    started = time.perf_counter()
    count = sum(1 for _ in open_source(path))
    return count / (time.perf_counter() - started)


def encoded_items(client: Client) -> int:
    return sum(b.items for b in client.info().batchers)


def ingest_rate(client: Client, path: Path, count: int, images: np.ndarray) -> dict[str, Any]:
    """Items/s of `clipsearch ingest FILE.parquet`'s code path, checked exact."""
    model_id = client.info().model_id
    client.create_collection(COLLECTION, exist_ok=True)
    before = encoded_items(client)
    started = time.perf_counter()
    summary = client.ingest_path(
        path, collection=COLLECTION, create_collection=False, progress=False
    )
    seconds = time.perf_counter() - started
    stored = client.count(collection=COLLECTION)
    if summary.ok != count or stored != count:
        raise RuntimeError(
            f"ingest: {summary.ok} ok, count {stored} of {count}: {summary.errors[:3]}"
        )
    encoded = encoded_items(client) - before
    if encoded:
        raise RuntimeError(f"the towers encoded {encoded} items of a vectors-only ingest")
    for row in CHECKED_ROWS:
        top = client.search(vector=images[row], top_k=1, collection=COLLECTION).hits[0]
        if top.id != f"vec-{row % count:07d}" or abs(top.score - 1.0) > 1e-4:
            raise RuntimeError(f"row {row}: Search(vector) found {top.id} ({top.score})")
    return {"items_per_s": count / seconds, "seconds": seconds, "model_id": model_id}


def _serve(stack: ExitStack, milvus_uri: str, model: str) -> Client:
    args = ["--log-level", "warning", "--milvus-uri", milvus_uri]
    if model:
        args += ["--model", model]
    server = stack.enter_context(ServerProcess(args))
    return stack.enter_context(Client(server.address, timeout=600))


def run(
    count: int,
    work: Path,
    *,
    model: str = "",
    server: bool = True,
    lite: bool = True,
    log: Callable[[str], None],
) -> dict[str, Any]:
    report: dict[str, Any] = {"items": count, "load_average": list(os.getloadavg())}
    path = work / "vectors.parquet"
    images: np.ndarray | None = None
    dim = 0
    lite_run: dict[str, Any] | None = None
    server_run: dict[str, Any] | None = None
    raw_lite: float | None = None
    raw_server: float | None = None

    def prepare(client: Client) -> np.ndarray:
        nonlocal dim, images
        if images is None:
            info = client.info()
            dim = info.dim
            started = time.perf_counter()
            images = write_vectors_parquet(path, count, dim, info.model_id)
            log(f"wrote {count} rows of {dim}-d vectors in {time.perf_counter() - started:.1f} s")
            report["parquet_bytes"] = path.stat().st_size
            report["parquet_read_items_per_s"] = round(read_rate(path), 1)
            log(f"reading the Parquet file alone: {report['parquet_read_items_per_s']} items/s")
        return images

    if lite:
        with ExitStack() as stack:
            client = _serve(stack, str(work / "lite.db"), model)
            lite_run = ingest_rate(client, path, count, prepare(client))
            log(f"ingest into Milvus Lite: {lite_run['items_per_s']:.0f} items/s")
        raw_lite = raw_upsert_rate(str(work / "raw.db"), count, dim)
        log(f"raw pymilvus upserts into Milvus Lite: {raw_lite:.0f} items/s")
    if server:
        executable = required_milvus_server_executable()
        with ExitStack() as stack:
            milvus = stack.enter_context(MilvusServerProcess(work / "milvus", executable))
            client = _serve(stack, milvus.uri, model)
            server_run = ingest_rate(client, path, count, prepare(client))
            log(f"ingest into a Milvus server: {server_run['items_per_s']:.0f} items/s")
            raw_server = raw_upsert_rate(milvus.uri, count, dim)
            log(f"raw pymilvus upserts into a Milvus server: {raw_server:.0f} items/s")
    lite_rate = lite_run["items_per_s"] if lite_run else None
    server_rate = server_run["items_per_s"] if server_run else None
    report.update(
        dim=dim,
        ingest_lite_items_per_s=rounded(lite_rate),
        ingest_server_items_per_s=rounded(server_rate),
        raw_upsert_lite_items_per_s=rounded(raw_lite),
        raw_upsert_server_items_per_s=rounded(raw_server),
        ingest_vs_raw_lite=ratio(lite_rate, raw_lite),
        ingest_vs_raw_server=ratio(server_rate, raw_server),
        lite_seconds=round(lite_run["seconds"], 2) if lite_run else None,
        server_seconds=round(server_run["seconds"], 2) if server_run else None,
    )
    return report


def main(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        print(f"bench ingest-vectors: {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-vectors-") as work:
        report = run(
            args.count,
            Path(work),
            model=args.model,
            server=not args.no_server,
            lite=not args.no_lite,
            log=log,
        )
    print_report(report, RESULT_KEYS, args.json)
    return 0
