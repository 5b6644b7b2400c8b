"""`clipsearch bench search`: a large collection of vectors in Milvus Lite and a Milvus server,
side by side, in one run.

For each --rows and each store, with the same vectors and the same queries:
  - insert: the rows go in through clipsearch's store layer (`MilvusStore.upsert`, batches of
    INSERT_BATCH items with an image vector and no caption) into a collection clipsearch
    created, whose vector index is dropped first and built after the last row (the bulk-load
    order: no index work while inserting);
  - flush, then index build (create the index; on the server, until every row is indexed;
    Lite builds it in create_index; on Lite both include closing the file, which waits for
    the background compaction and index builds they queued) and load (the server's first
    load; on Lite, loading the built index from the file, as a restarted process does);
  - search p50/p99 of the same queries through pymilvus `client.search` from this process
    (with the search params clipsearch would send) and through `clipsearch serve`'s
    `Search(vector)` on loopback gRPC (the `Client` from this process, one call at a time);
    recall@10 of each against exact top 10 by numpy matrix products;
  - memory: the RSS of the `clipsearch serve` process tree (which embeds Milvus Lite) and of
    the Milvus server's tree, after the searches.
There is no gRPC ingest of ready vectors to time, so the insert rate is the store layer's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import MilvusClient

from clipsearch.bench import search_data as data
from clipsearch.bench.milvus_server import MilvusServerProcess, required_milvus_server_executable
from clipsearch.client import Client
from clipsearch.server.bundle import default_bundle_path, load_bundle
from clipsearch.server.limits import is_milvus_lite
from clipsearch.server.process import ServerProcess, ServerProcessError
from clipsearch.server.store.api import StoredItem
from clipsearch.server.store.indexing import IndexConfig, search_params
from clipsearch.server.store.lite import LiteDatabase
from clipsearch.server.store.milvus import IMAGE_VECTOR, MilvusStore

COLLECTION = "bench_search"
INSERT_BATCH = 2048
WARMUP_QUERIES = 5
ENCODE_BATCH = 64
DDL_TIMEOUT_S = 7200.0
STORES = ("lite", "server")
SOURCES = ("random", "demo")
RUN_KEYS = (
    "rows",
    "store",
    "rows_inserted",
    "count",
    "insert_s",
    "insert_rows_per_s",
    "flush_s",
    "index_build_s",
    "load_s",
    "serve_start_s",
    "pymilvus",
    "clipsearch",
    "clipsearch_store_mean_ms",
    "memory",
    "clipsearch_error",
)
SEARCH_KEYS = ("p50_ms", "p99_ms", "mean_ms", "recall_at_10")

Log = Callable[[str], None]


@dataclass(frozen=True)
class SearchBenchConfig:
    rows: tuple[int, ...] = (100_000,)
    dim: int = 512
    source: str = "random"
    stores: tuple[str, ...] = STORES
    queries: int = 500
    index_type: str = "HNSW"
    max_insert_s: float = 0.0  # 0: no bound
    model: str = ""  # "" = the demo model at its dim, else a random-weight model (model_for)
    work_dir: str = "~/.cache/clipsearch/bench"
    seed: int = 0


@dataclass
class SearchPath:
    """One way of searching: its latency and the rows it returned per query."""

    seconds: list[float]
    found: list[list[int]]

    def summary(self, truth: np.ndarray) -> dict[str, float]:
        return {
            **asdict(data.Latency.of(self.seconds)),
            "recall_at_10": round(data.recall_at_k(self.found, truth), 4),
        }


def model_for(config: SearchBenchConfig, log: Log) -> Path:
    """The bundle `clipsearch serve` serves: a collection belongs to a model of its dim.

    The demo model when --dim is its dim; otherwise a tiny random-weight CLIP whose
    projection is --dim, exported once into --work-dir (the model only owns the collection:
    a search by vector runs no inference)."""
    if config.model:
        return Path(config.model).expanduser()
    demo = default_bundle_path()
    if load_bundle(demo).manifest.dim == config.dim:
        return demo
    out = Path(config.work_dir).expanduser() / f"search-model-dim{config.dim}"
    if (out / "manifest.json").is_file():
        return out
    log(f"exporting a random-weight {config.dim}-d model into {out} (once)")
    from clipsearch.export.exporter import export_bundle  # noqa: PLC0415 (torch: only here)
    from clipsearch.export.tokenizers import (  # noqa: PLC0415
        make_random_clip_checkpoint,
        tiny_clip_config,
    )

    clip_config = tiny_clip_config()
    clip_config.projection_dim = config.dim
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-model-") as tmp:
        checkpoint = make_random_clip_checkpoint(Path(tmp) / "checkpoint", clip_config)
        export_bundle(checkpoint, out, precisions=("fp32",), progress=lambda _: None)
    return out


def demo_vectors(rows: int, queries: int, log: Log) -> tuple[np.ndarray, np.ndarray]:
    """The demo model's vectors: image vectors of DEMO_SCENES generated scenes, perturbed to
    `rows` rows (`search_data.perturbed_rows`), and the caption vectors of `queries` other
    scenes as the queries (text → image, as the service is used). Encoding every row would
    take ~10 minutes per 100k on this machine's two cores for no new information: the
    perturbed rows keep the model's clusters, which is what random vectors lack."""
    from clipsearch.export.demo_data import (  # noqa: PLC0415 (PIL: only here)
        DEFAULT_TWO_OBJECT_FRACTION,
        encode_jpeg,
        render_scene,
        sample_scene,
        scene_rng,
    )

    scenes = min(rows, data.DEMO_SCENES)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-search-") as tmp:
        server = ServerProcess(["--log-level", "warning", "--milvus-uri", f"{tmp}/encode.db"])
        with server, Client(server.address, timeout=600) as client:
            size = client.info().image_size
            images, captions = [], []
            for start in range(0, scenes, ENCODE_BATCH):
                jpegs = [
                    encode_jpeg(render_scene(sample_scene(scene_rng(7, i), 0.5), size))
                    for i in range(start, min(start + ENCODE_BATCH, scenes))
                ]
                images.append(client.encode_images(jpegs).vectors)
            texts = [
                sample_scene(scene_rng(7, scenes + i), DEFAULT_TWO_OBJECT_FRACTION).caption_en
                for i in range(queries)
            ]
            for start in range(0, queries, ENCODE_BATCH):
                captions.append(client.encode_texts(texts[start : start + ENCODE_BATCH]).vectors)
    log(f"encoded {scenes} demo images and {queries} captions in "
        f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    base = np.concatenate(images).astype(np.float32)
    return data.perturbed_rows(base, rows, seed=1), np.concatenate(captions).astype(np.float32)


def source_vectors(config: SearchBenchConfig, log: Log) -> tuple[np.ndarray, np.ndarray]:
    rows = max(config.rows)
    if config.source == "random":
        vectors = data.random_vectors(rows, config.dim, config.seed)
        queries = data.random_vectors(config.queries, config.dim, config.seed + 1)
        return vectors, queries
    vectors, queries = demo_vectors(rows, config.queries, log)
    # The demo model's own dim may be smaller: an orthonormal map keeps every ranking.
    return data.embed(vectors, config.dim, 2), data.embed(queries, config.dim, 2)


def _index_params(index: IndexConfig) -> Any:
    params = MilvusClient.prepare_index_params()
    params.add_index(
        field_name=IMAGE_VECTOR,
        index_type=index.index_type,
        metric_type=index.metric,
        params=dict(index.build_params),
    )
    return params


def _insert(
    store: MilvusStore, rows: np.ndarray, max_seconds: float, log: Log
) -> tuple[int, float]:
    """Rows inserted and the seconds it took; stops early past `max_seconds` (0: never)."""
    started = time.perf_counter()
    inserted = 0
    next_log = started + 30
    while inserted < len(rows):
        batch = rows[inserted : inserted + INSERT_BATCH]
        store.upsert(
            COLLECTION,
            [StoredItem(id=data.row_id(inserted + i), image_vector=v) for i, v in enumerate(batch)],
        )
        inserted += len(batch)
        now = time.perf_counter()
        if now >= next_log:
            log(f"  {inserted:,} rows, {inserted / (now - started):,.0f} rows/s")
            next_log = now + 30
        if max_seconds and now - started > max_seconds and inserted < len(rows):
            log(f"  stopped inserting after {now - started:.0f} s (--max-insert-s)")
            break
    return inserted, time.perf_counter() - started


def _wait_indexed(milvus: MilvusClient, index_name: str, rows: int) -> None:
    deadline = time.monotonic() + DDL_TIMEOUT_S
    while time.monotonic() < deadline:
        described = milvus.describe_index(COLLECTION, index_name) or {}
        if described.get("state") == "Finished" and described.get("indexed_rows", 0) >= rows:
            return
        if described.get("state") == "Failed":
            raise RuntimeError(f"index build failed: {described}")
        time.sleep(0.5)
    raise RuntimeError(f"the index was not built within {DDL_TIMEOUT_S:.0f} s")


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _pymilvus_search(milvus: MilvusClient, index: IndexConfig, queries: np.ndarray) -> SearchPath:
    settings = {"metric_type": index.metric, "params": search_params(index, data.TOP_K, 0, None)}

    def search(query: np.ndarray) -> list[int]:
        hits = milvus.search(
            COLLECTION,
            data=[query.tolist()],
            limit=data.TOP_K,
            output_fields=["uri", "caption", "metadata"],  # what clipsearch asks for by default
            search_params=settings,
            anns_field=IMAGE_VECTOR,
        )
        return [data.row_of(hit["id"]) for hit in hits[0]]

    return _timed_queries(search, queries)


def _timed_queries(search: Callable[[np.ndarray], list[int]], queries: np.ndarray) -> SearchPath:
    for query in queries[:WARMUP_QUERIES]:
        search(query)
    path = SearchPath([], [])
    for query in queries:
        started = time.perf_counter()
        found = search(query)
        path.seconds.append(time.perf_counter() - started)
        path.found.append(found)
    return path


@contextlib.contextmanager
def _pymilvus(uri: str) -> Iterator[MilvusClient]:
    """A pymilvus client of this store: a Lite file this process has open is reached through
    its socket (opening the file again would try to lock it twice)."""
    client = MilvusClient(
        uri=LiteDatabase.endpoint(uri) if is_milvus_lite(uri) else uri, timeout=DDL_TIMEOUT_S
    )
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _opened(uri: str) -> Iterator[MilvusClient]:
    """A pymilvus client of the store, opening a Lite file in this process for it (and
    closing it after, which waits for Lite's background compaction and index builds)."""
    lite = LiteDatabase.open(uri) if is_milvus_lite(uri) else None
    try:
        with _pymilvus(uri) as milvus:
            yield milvus
    finally:
        if lite is not None:
            lite.release()


def _load_into(
    uri: str, rows: np.ndarray, model_id: str, index: IndexConfig, *, max_insert_s: float, log: Log
) -> dict[str, Any]:
    """Create the collection, drop its index, insert, flush, build the index; on a server
    also load it. On Lite, flush_s and index_build_s include closing the file, which waits
    for the background compaction (and index builds) they queued."""
    lite = is_milvus_lite(uri)
    figures: dict[str, Any] = {}
    with MilvusStore(uri, index=index, timeout_s=600) as store:
        store.create_collection(COLLECTION, rows.shape[1], model_id)
        with _pymilvus(uri) as milvus:
            milvus.release_collection(COLLECTION)
            for name in milvus.list_indexes(COLLECTION):
                milvus.drop_index(COLLECTION, name)
        inserted, insert_s = _insert(store, rows, max_insert_s, log)
        log(f"  inserted {inserted:,} rows: {inserted / insert_s:,.0f} rows/s")
        flush_started = time.perf_counter()
        with _pymilvus(uri) as milvus:
            milvus.flush(COLLECTION)
    figures.update(
        rows_inserted=inserted,
        insert_s=round(insert_s, 2),
        insert_rows_per_s=round(inserted / insert_s, 1),
        flush_s=round(time.perf_counter() - flush_started, 2),
    )
    build_started = time.perf_counter()
    with _opened(uri) as milvus:
        # Lite builds every segment's index in create_index (its collection without an
        # index counts as loaded), a server in the background: wait for every row.
        milvus.create_index(COLLECTION, _index_params(index))
        if not lite:
            _wait_indexed(milvus, milvus.list_indexes(COLLECTION)[0], inserted)
            figures["index_build_s"] = round(time.perf_counter() - build_started, 2)
            load = lambda: milvus.load_collection(COLLECTION, timeout=DDL_TIMEOUT_S)  # noqa: E731
            figures["load_s"] = round(_timed(load), 2)
    if lite:
        figures["index_build_s"] = round(time.perf_counter() - build_started, 2)
    log(f"  flush {figures['flush_s']} s, index build {figures['index_build_s']} s")
    return figures


def _pymilvus_phase(
    uri: str, index: IndexConfig, queries: np.ndarray, figures: dict[str, Any]
) -> SearchPath:
    """pymilvus searches from this process; Lite's file is opened afresh here, and its load
    (of the index built and saved before) is the Lite `load_s`."""
    with _opened(uri) as milvus:
        if is_milvus_lite(uri):
            load = lambda: milvus.load_collection(COLLECTION, timeout=DDL_TIMEOUT_S)  # noqa: E731
            figures["load_s"] = round(_timed(load), 2)
        return _pymilvus_search(milvus, index, queries)


def _clipsearch_phase(
    uri: str, model: Path, queries: np.ndarray, figures: dict[str, Any], milvus_pid: int | None
) -> SearchPath:
    started = time.perf_counter()
    args = ["--log-level", "warning", "--milvus-uri", uri, "--model", str(model)]
    with ServerProcess(args, startup_timeout_s=DDL_TIMEOUT_S) as server:
        figures["serve_start_s"] = round(time.perf_counter() - started, 2)
        with Client(server.address, timeout=600) as client:
            figures["count"] = client.count(collection=COLLECTION)
            store_us: list[int] = []

            def search(query: np.ndarray) -> list[int]:
                result = client.search(vector=query, top_k=data.TOP_K, collection=COLLECTION)
                store_us.append(result.timing.search_us)
                return [data.row_of(hit.id) for hit in result.hits]

            path = _timed_queries(search, queries)
            measured = store_us[WARMUP_QUERIES:]
            figures["clipsearch_store_mean_ms"] = round(sum(measured) / len(measured) / 1000, 3)
        serve = data.child_matching(lambda command: "clipsearch serve" in command)
        memory = {"serve": data.tree_memory_mib(serve) if serve else None}
        if milvus_pid is not None:
            memory["milvus_server"] = data.tree_memory_mib(milvus_pid)
        figures["memory"] = memory
    return path


def measure_store(
    store: str,
    uri: str,
    rows: np.ndarray,
    queries: np.ndarray,
    truth_for: Callable[[int], np.ndarray],
    *,
    model: Path,
    model_id: str,
    config: SearchBenchConfig,
    milvus_pid: int | None,
    log: Log,
) -> dict[str, Any]:
    index = IndexConfig.defaults_for(config.index_type, "IP")
    log(f"{store}, {len(rows):,} rows, {config.index_type}:")
    figures: dict[str, Any] = {"rows": len(rows), "store": store}
    loaded = _load_into(uri, rows, model_id, index, max_insert_s=config.max_insert_s, log=log)
    figures.update(loaded)
    truth = truth_for(figures["rows_inserted"])
    direct = _pymilvus_phase(uri, index, queries, figures)
    figures["pymilvus"] = direct.summary(truth)
    log(f"  load {figures['load_s']} s; pymilvus: {figures['pymilvus']}")
    try:
        served = _clipsearch_phase(uri, model, queries, figures, milvus_pid)
    except ServerProcessError as exc:  # e.g. a store too slow to open: the figures so far count
        figures["clipsearch_error"] = str(exc)[-600:]
        log(f"  clipsearch serve failed: {figures['clipsearch_error']}")
        return {key: figures.get(key) for key in RUN_KEYS}
    figures["clipsearch"] = served.summary(truth)
    log(f"  clipsearch Search(vector): {figures['clipsearch']}, memory {figures['memory']}")
    return {key: figures.get(key) for key in RUN_KEYS}


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor()}, {os.cpu_count()} cores"


def run(
    config: SearchBenchConfig,
    work: Path,
    log: Log,
    *,
    milvus_server: MilvusServerProcess | None = None,
) -> dict[str, Any]:
    """Every (rows, store) of `config`. `milvus_server`: a running server to use (its
    collection is dropped after each run) instead of a fresh one per run."""
    report: dict[str, Any] = {
        "config": asdict(config),
        "cpu": _cpu(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    model = model_for(config, log)
    manifest = load_bundle(model).manifest
    if manifest.dim != config.dim:
        raise ValueError(f"model {model} has dim {manifest.dim}, not --dim {config.dim}")
    started = time.perf_counter()
    vectors, queries = source_vectors(config, log)
    report["vectors_s"] = round(time.perf_counter() - started, 1)
    truths: dict[int, np.ndarray] = {}

    def truth_for(rows: int) -> np.ndarray:
        if rows not in truths:
            began = time.perf_counter()
            truths[rows] = data.exact_top_k(vectors[:rows], queries)
            log(f"  exact top {data.TOP_K} over {rows:,} rows: {time.perf_counter() - began:.1f} s")
        return truths[rows]

    runs = []
    for rows in config.rows:
        for store in config.stores:
            with ExitStack() as stack:
                milvus: MilvusServerProcess | None = None
                if store == "lite":
                    uri = str(work / f"lite-{rows}.db")
                else:
                    milvus = milvus_server or stack.enter_context(_fresh_server(work / f"m{rows}"))
                    uri = milvus.uri
                    if milvus_server is not None:
                        stack.callback(_drop, uri)
                runs.append(
                    measure_store(
                        store,
                        uri,
                        vectors[:rows],
                        queries,
                        truth_for,
                        model=model,
                        model_id=manifest.model_id,
                        config=config,
                        milvus_pid=milvus.pid if milvus else None,
                        log=log,
                    )
                )
            if store == "lite":
                for leftover in work.glob(f"lite-{rows}.db*"):
                    _remove(leftover)
    report["runs"] = runs
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _fresh_server(data_dir: Path) -> MilvusServerProcess:
    executable = required_milvus_server_executable()
    return MilvusServerProcess(data_dir, executable)


def _drop(uri: str) -> None:
    with _pymilvus(uri) as milvus:
        for name in milvus.list_collections():
            if name.startswith(COLLECTION):
                milvus.drop_collection(name)


def _remove(path: Path) -> None:
    import shutil  # noqa: PLC0415

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def parse_rows(values: Sequence[str]) -> tuple[int, ...]:
    rows = [int(part.replace("_", "")) for value in values for part in value.split(",") if part]
    if not rows or min(rows) < 1:
        raise ValueError(f"--rows must be positive counts, got {values}")
    return tuple(rows)


def config_from(args: argparse.Namespace) -> SearchBenchConfig:
    stores = tuple(part.strip() for part in args.stores.split(",") if part.strip())
    unknown = set(stores) - set(STORES)
    if not stores or unknown:
        raise ValueError(f"--stores: choose from {', '.join(STORES)}, got {args.stores!r}")
    return SearchBenchConfig(
        rows=parse_rows(args.rows or ["100000"]),
        dim=args.dim,
        source=args.source,
        stores=stores,
        queries=args.queries,
        index_type=args.index_type,
        max_insert_s=args.max_insert_s,
        model=args.model,
        work_dir=args.work_dir,
    )


def main(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        print(f"bench search: {line}", file=sys.stderr, flush=True)

    try:
        config = config_from(args)
    except ValueError as exc:
        print(f"bench search: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-search-") as work:
        report = run(config, Path(work), log)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for figures in report["runs"]:
            served = figures["clipsearch"] or {"p50_ms": 0.0, "p99_ms": 0.0}
            print(
                f"{figures['store']:6} {figures['rows_inserted']:>9,} rows  "
                f"insert {figures['insert_rows_per_s']:>8,.0f} rows/s  "
                f"build {figures['index_build_s']:>7.1f} s  load {figures['load_s']:>6.1f} s  "
                f"pymilvus p50/p99 {figures['pymilvus']['p50_ms']:.1f}/"
                f"{figures['pymilvus']['p99_ms']:.1f} ms  "
                f"clipsearch p50/p99 {served['p50_ms']:.1f}/{served['p99_ms']:.1f} ms  "
                f"recall@10 {figures['pymilvus']['recall_at_10']:.3f}"
                + (
                    f"  serve failed: {figures['clipsearch_error'][-200:]}"
                    if figures["clipsearch_error"]
                    else ""
                )
            )
    return 0
