"""`clipsearch bench ingest`: streaming ingest against the encoder-only rate, in one run.

Generates N demo scenes (JPEG + English caption + a little metadata) in memory, starts
`clipsearch serve` (the demo model) and measures, with the same items:
  - encoder only: `EncodeStream` in batches of 32 images and 32 captions, nothing stored;
  - ingest into Milvus Lite (the server's own file) and into a Milvus server started for
    the run (`milvus-server`), through `Client.ingest`, into a collection created before
    the clock starts (creating one takes seconds on a server);
  - ingest with no store at all (`--milvus-uri memory:`, the server's in-memory store): the
    cost of the ingest path itself, apart from any store's (`ingest_vs_encoder_memory`);
  - Lite's and the server's own limits: raw pymilvus upserts of the same number of rows
    (image row + caption row per item, batches of the server's group-commit size) from
    this process, no clipsearch code in between.
The encoder-only rate is measured in each `clipsearch serve` process: with Lite, and again
beside the running Milvus server (which takes CPU even when idle; on a small machine that
shows), and each ingest is compared with its own. It prints `ingest_vs_encoder_server` and
`ingest_vs_encoder_lite` with every rate, plus the
server's per-item breakdown (mean store and inference µs, mean commit batch size) and, on
Linux, where the CPU went in each phase (`cpu`: milliseconds per item in the clipsearch
server, the Milvus server and this client, and the cores they kept busy together: on a
small machine the encoder, Milvus and the client share the same cores).
`--serve-arg` passes flags to both `clipsearch serve` processes, to compare settings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient

from clipsearch.bench.cpu import CpuSplit, measure_cpu
from clipsearch.bench.milvus_server import MilvusServerProcess, required_milvus_server_executable
from clipsearch.bench.report import print_report, ratio, rounded
from clipsearch.client import Client
from clipsearch.client.types import IngestItem, IngestResult
from clipsearch.export.demo_data import (
    DEFAULT_TWO_OBJECT_FRACTION,
    encode_jpeg,
    render_scene,
    sample_scene,
    scene_rng,
)
from clipsearch.server.limits import IN_MEMORY_STORE
from clipsearch.server.process import ServerProcess
from clipsearch.server.store.indexing import IndexConfig

T = TypeVar("T")

COLLECTION = "bench_ingest"
ENCODE_BATCH = 32
RAW_BATCH = 64
IMAGE_SIZE = 128
SEED = 11
RESULT_KEYS = (
    "items",
    "encoder_items_per_s",
    "encoder_beside_server_items_per_s",
    "encoder_memory_items_per_s",
    "ingest_memory_items_per_s",
    "ingest_lite_items_per_s",
    "ingest_server_items_per_s",
    "raw_upsert_lite_items_per_s",
    "raw_upsert_server_items_per_s",
    "ingest_vs_encoder_memory",
    "ingest_vs_encoder_lite",
    "ingest_vs_encoder_server",
    "ingest_vs_raw_lite",
)


@dataclass(frozen=True)
class DemoItem:
    id: str
    image: bytes
    caption: str
    metadata: dict[str, Any]


def demo_items(count: int, seed: int = SEED) -> list[DemoItem]:
    items = []
    for index in range(count):
        scene = sample_scene(scene_rng(seed, index), DEFAULT_TWO_OBJECT_FRACTION)
        first = scene.objects[0]
        items.append(
            DemoItem(
                id=f"bench-{seed}-{index:07d}",
                image=encode_jpeg(render_scene(scene, IMAGE_SIZE)),
                caption=scene.caption_en,
                metadata={"shape": first.shape, "colour": first.colour, "n": len(scene.objects)},
            )
        )
    return items


@dataclass
class IngestRun:
    items_per_s: float
    seconds: float
    ok: int
    failed: int
    mean_total_us: float
    mean_queue_us: float
    mean_preprocess_us: float
    mean_store_us: float
    mean_inference_us: float
    mean_batch_size: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items()}


def encoder_rate(client: Client, items: Sequence[DemoItem]) -> float:
    def batches() -> Iterator[list[str | bytes]]:
        for start in range(0, len(items), ENCODE_BATCH):
            chunk = items[start : start + ENCODE_BATCH]
            yield [item.image for item in chunk]
            yield [item.caption for item in chunk]

    started = time.perf_counter()
    results = list(client.encode_stream(batches()))
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"encoding failed: {failed[:3]}")
    return len(items) / seconds


def ingest_rate(client: Client, items: Sequence[DemoItem]) -> IngestRun:
    client.create_collection(COLLECTION, exist_ok=True)
    sent = [
        IngestItem(id=i.id, image=i.image, caption=i.caption, metadata=i.metadata) for i in items
    ]
    results: list[IngestResult] = []
    started = time.perf_counter()
    for result in client.ingest(sent, collection=COLLECTION, create_collection=False):
        results.append(result)
    seconds = time.perf_counter() - started
    ok = sum(r.ok for r in results)
    count = client.count(collection=COLLECTION)
    if ok != len(items) or count != len(items):
        errors = [r.error for r in results if not r.ok][:3]
        raise RuntimeError(f"ingest: {ok} ok, count {count} of {len(items)}: {errors}")
    n = max(len(results), 1)
    return IngestRun(
        items_per_s=len(items) / seconds,
        seconds=seconds,
        ok=ok,
        failed=len(results) - ok,
        mean_total_us=sum(r.timing.total_us for r in results) / n,
        mean_queue_us=sum(r.timing.queue_us for r in results) / n,
        mean_preprocess_us=sum(r.timing.preprocess_us for r in results) / n,
        mean_store_us=sum(r.timing.search_us for r in results) / n,
        mean_inference_us=sum(r.timing.inference_us for r in results) / n,
        mean_batch_size=sum(r.timing.batch_size for r in results) / n,
    )


def raw_upsert_rate(uri: str, count: int, dim: int, batch: int = RAW_BATCH) -> float:
    """Items/s of bare pymilvus upserts (an image row and a caption row per item) into two
    collections shaped like a clipsearch collection and its caption companion."""
    config = IndexConfig.defaults_for("HNSW", "IP")
    client = MilvusClient(uri=uri, timeout=60)
    names = ("raw_images", "raw_captions")
    try:
        for name in names:
            if client.has_collection(name):
                client.drop_collection(name)
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field("uri", DataType.VARCHAR, max_length=2048)
            schema.add_field("caption", DataType.VARCHAR, max_length=4096)
            schema.add_field("metadata", DataType.JSON)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = MilvusClient.prepare_index_params()
            index.add_index(
                field_name="vector",
                index_type=config.index_type,
                metric_type=config.metric,
                params=dict(config.build_params),
            )
            client.create_collection(name, schema=schema, index_params=index)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((count, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = [
            {
                "id": f"raw-{i:07d}",
                "uri": "",
                "caption": "a red circle",
                "metadata": {"shape": "circle", "colour": "red", "n": 1},
                "vector": vectors[i],
            }
            for i in range(count)
        ]
        started = time.perf_counter()
        for start in range(0, count, batch):
            for name in names:
                client.upsert(name, rows[start : start + batch])
        return count / (time.perf_counter() - started)
    finally:
        for name in names:
            with contextlib.suppress(Exception):  # best effort: the data dir goes anyway
                client.drop_collection(name)
        client.close()


def _serve(stack: ExitStack, milvus_uri: str, serve_args: Sequence[str]) -> ServerProcess:
    return stack.enter_context(
        ServerProcess(["--log-level", "warning", "--milvus-uri", milvus_uri, *serve_args])
    )


def _with_cpu(
    items: int, server: ServerProcess, store_pid: int | None, work: Callable[[], T]
) -> tuple[T, CpuSplit | None]:
    results: list[T] = []
    split = measure_cpu(items, server.pid or 0, store_pid, lambda: results.append(work()))
    return results[0], split


def _encode_then_ingest(
    stack: ExitStack,
    uri: str,
    store_pid: int | None,
    *,
    items: Sequence[DemoItem],
    serve_args: Sequence[str],
    cpu: dict[str, dict[str, float] | None],
    store: str,
) -> tuple[float, IngestRun, int]:
    """In one `clipsearch serve` on store `uri`: the encoder-only rate, then ingest, each with
    its CPU split in `cpu` (`encoder_STORE`, `ingest_STORE`); and the served dimension."""
    serving = _serve(stack, uri, serve_args)
    client = stack.enter_context(Client(serving.address, timeout=600))
    list(client.encode_stream([[items[0].image], [items[0].caption]]))  # warm up
    count = len(items)
    encoder, split = _with_cpu(count, serving, store_pid, lambda: encoder_rate(client, items))
    cpu[f"encoder_{store}"] = split.to_dict() if split else None
    ingested, split = _with_cpu(count, serving, store_pid, lambda: ingest_rate(client, items))
    cpu[f"ingest_{store}"] = split.to_dict() if split else None
    return encoder, ingested, client.info().dim


def run(
    count: int,
    work: Path,
    *,
    server: bool = True,
    lite: bool = True,
    memory: bool = True,
    serve_args: Sequence[str] = (),
    log: Callable[[str], None],
) -> dict[str, Any]:
    started = time.perf_counter()
    items = demo_items(count)
    log(f"generated {count} items in {time.perf_counter() - started:.1f} s")
    report: dict[str, Any] = {
        "items": count,
        "load_average": list(os.getloadavg()),
        "serve_args": list(serve_args),
    }
    encoder: float | None = None
    encoder_memory: float | None = None
    memory_run: IngestRun | None = None
    lite_run: IngestRun | None = None
    server_run: IngestRun | None = None
    raw_lite: float | None = None
    raw_server: float | None = None
    encoder_beside_server: float | None = None
    cpu: dict[str, dict[str, float] | None] = {}
    if memory:
        with ExitStack() as stack:
            encoder_memory, memory_run, _ = _encode_then_ingest(
                stack,
                IN_MEMORY_STORE,
                None,
                items=items,
                serve_args=serve_args,
                cpu=cpu,
                store="memory",
            )
        log(f"ingest with no store (in memory): {memory_run.items_per_s:.0f} items/s")
    if lite:
        with ExitStack() as stack:
            encoder, lite_run, dim = _encode_then_ingest(
                stack,
                str(work / "lite.db"),
                None,
                items=items,
                serve_args=serve_args,
                cpu=cpu,
                store="lite",
            )
        log(f"encoder only: {encoder:.0f} items/s")
        log(f"ingest into Milvus Lite: {lite_run.items_per_s:.0f} items/s")
        raw_lite = raw_upsert_rate(str(work / "raw.db"), count, dim)
        log(f"raw pymilvus upserts into Milvus Lite: {raw_lite:.0f} items/s")
    if server:
        executable = required_milvus_server_executable()
        with ExitStack() as stack:
            milvus = stack.enter_context(MilvusServerProcess(work / "milvus", executable))
            # The encoder measured again beside the Milvus server, which takes CPU even idle.
            encoder_beside_server, server_run, dim = _encode_then_ingest(
                stack,
                milvus.uri,
                milvus.pid,
                items=items,
                serve_args=serve_args,
                cpu=cpu,
                store="server",
            )
            log(f"encoder only, beside the Milvus server: {encoder_beside_server:.0f} items/s")
            log(f"ingest into a Milvus server: {server_run.items_per_s:.0f} items/s")
            raw_server = raw_upsert_rate(milvus.uri, count, dim)
            log(f"raw pymilvus upserts into a Milvus server: {raw_server:.0f} items/s")
    memory_rate = memory_run.items_per_s if memory_run else None
    lite_rate = lite_run.items_per_s if lite_run else None
    server_rate = server_run.items_per_s if server_run else None
    report.update(
        encoder_items_per_s=rounded(encoder),
        encoder_memory_items_per_s=rounded(encoder_memory),
        ingest_memory_items_per_s=rounded(memory_rate),
        encoder_beside_server_items_per_s=rounded(encoder_beside_server),
        ingest_lite_items_per_s=rounded(lite_rate),
        ingest_server_items_per_s=rounded(server_rate),
        raw_upsert_lite_items_per_s=rounded(raw_lite),
        raw_upsert_server_items_per_s=rounded(raw_server),
        ingest_vs_encoder_memory=ratio(memory_rate, encoder_memory),
        ingest_vs_encoder_lite=ratio(lite_rate, encoder),
        ingest_vs_encoder_server=ratio(server_rate, encoder_beside_server),
        ingest_vs_raw_lite=ratio(lite_rate, raw_lite),
        memory=memory_run.to_dict() if memory_run else None,
        lite=lite_run.to_dict() if lite_run else None,
        server=server_run.to_dict() if server_run else None,
        cpu=cpu,
    )
    return report


def main(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        print(f"bench ingest: {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-ingest-") as work:
        report = run(
            args.count,
            Path(work),
            server=not args.no_server,
            lite=not args.no_lite,
            memory=not args.no_memory,
            serve_args=args.serve_arg,
            log=log,
        )
    print_report(report, RESULT_KEYS, args.json)
    return 0
