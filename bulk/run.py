"""A bulk run: SOURCE → work rows (driver) → encode actors (Ray Data) → a sink (driver).

The driver lists the items (paths only), drops those already stored when resuming
(`skip_existing`, checked by id in batches before anything is read or encoded), and hands
them to Ray Data, which streams them through a pool of encode actors (one `OnnxEncoder`
each, `actors` of them, `cpus_per_actor` / `gpus_per_actor` reserved per actor, anywhere in
the Ray cluster). Encoded batches stream back to the driver, which writes them by id through
the store (or to Parquet) while later batches are still encoding.

Writing from the driver keeps one writer per collection (a Milvus Lite file can only be open
in one process) and one place that counts; an upsert of 512 rows to a Milvus server takes a
few tens of milliseconds, far less than encoding them, so the writer is not the bottleneck
until well past a hundred CPU actors.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import ray
import ray.data
from tqdm import tqdm

import clipsearch
from clipsearch.bulk.encode import EncodeActor
from clipsearch.bulk.existing import ExistingIds
from clipsearch.bulk.sinks import BatchOutcome, MilvusSink, ParquetSink, Sink
from clipsearch.bulk.sources import work_rows, work_tables
from clipsearch.server.bundle import Manifest, default_bundle_path, load_bundle
from clipsearch.server.errors import ConfigurationError, ModelMismatch, NotFound
from clipsearch.server.settings import Settings
from clipsearch.server.store import MilvusStore

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
WRITE_BATCH = 512
LOCAL_START_ATTEMPTS = 3


class BulkError(Exception):
    """A problem with the run's inputs (source, collection, options): nothing was written."""


@dataclass(frozen=True)
class BulkOptions:
    source: str
    collection: str
    milvus_uri: str = ""
    milvus_token: str = ""
    parquet_out: str = ""
    model: str = ""
    actors: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    ray_address: str = ""
    skip_existing: bool = False
    create: bool = False
    caption_field: str | None = None
    write_batch: int = WRITE_BATCH
    progress: bool = True

    def settings(self, env: dict[str, str] | None = None) -> Settings:
        """The server's settings for this run: flags here, else CLIPSEARCH_* variables."""
        threads = max(1, int(self.cpus_per_actor))
        overrides: dict[str, Any] = {
            "model": self.model or None,
            "milvus_uri": self.milvus_uri or None,
            "milvus_token": self.milvus_token or None,
            "intra_op_threads": threads,
        }
        if self.gpus_per_actor > 0 and "CLIPSEARCH_DEVICE" not in (env or os.environ):
            overrides["device"] = "cuda"
        return Settings.from_env(env, **overrides)


@dataclass
class BulkSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    seconds: float = 0.0
    destination: str = ""
    actors: int = 0
    batch_size: int = 0
    # When the first encoded batch was written (Ray and the actors had started by then), and
    # the items written after it: the steady rate, without start-up.
    steady_from_s: float = 0.0
    steady_items: int = 0

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def items_per_second(self) -> float:
        encoded = self.ok + self.failed
        return encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_items_per_second(self) -> float:
        steady = self.seconds - self.steady_from_s
        return self.steady_items / steady if self.steady_from_s and steady > 0 else 0.0

    def add(self, outcome: BatchOutcome) -> None:
        self.ok += outcome.ok
        self.skipped += outcome.skipped
        self.failed += len(outcome.failed)
        self.errors += outcome.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "skipped": self.skipped,
            "errors": [{"id": item, "error": error} for item, error in self.errors],
            "seconds": round(self.seconds, 3),
            "items_per_second": round(self.items_per_second, 2),
            "startup_seconds": round(self.steady_from_s, 3),
            "steady_items_per_second": round(self.steady_items_per_second, 2),
            "destination": self.destination,
            "actors": self.actors,
            "batch_size": self.batch_size,
        }


def run(options: BulkOptions) -> BulkSummary:
    if options.actors < 1 or options.batch_size < 1 or options.write_batch < 1:
        raise BulkError("--actors, --batch-size and --write-batch must be at least 1")
    if bool(options.milvus_uri) == bool(options.parquet_out):
        raise BulkError("give exactly one destination: --milvus-uri URI or --parquet-out DIR")
    if options.skip_existing and not options.milvus_uri:
        raise BulkError("--skip-existing checks ids in Milvus: it needs --milvus-uri")
    settings = options.settings()
    manifest = load_bundle(settings.model or default_bundle_path()).manifest
    started = time.perf_counter()
    summary = BulkSummary(actors=options.actors, batch_size=options.batch_size)
    tables = list(work_tables(work_rows(options.source, options.caption_field)))
    sink: Sink
    if options.milvus_uri:
        store = MilvusStore.from_settings(settings)
        existing = None
        try:
            _prepare_collection(store, options, manifest)
            if options.skip_existing:
                existing = ExistingIds(store, settings.milvus_uri, settings.milvus_token)
                tables, summary.skipped = _drop_existing(existing, options.collection, tables)
        except BaseException:
            if existing is not None:
                existing.close()
            store.close()
            raise
        sink = MilvusSink(store, options.collection, existing)
        summary.destination = f"{store!r}/{options.collection}"
    else:
        sink = ParquetSink(Path(options.parquet_out), options.collection)
        summary.destination = str(Path(options.parquet_out) / options.collection)
    try:
        _encode_and_write(options, settings, tables, sink, summary, started=started)
    finally:
        sink.close()
        summary.seconds = time.perf_counter() - started
    return summary


def _prepare_collection(store: MilvusStore, options: BulkOptions, manifest: Manifest) -> None:
    """The collection exists (created with `create`) and holds this model's vectors."""
    if options.create:
        store.create_collection(options.collection, manifest.dim, manifest.model_id, exist_ok=True)
        return
    try:
        info = store.describe(options.collection)
    except NotFound:
        raise BulkError(
            f"collection {options.collection!r} does not exist (pass --create to create it)"
        ) from None
    if (info.model_id, info.dim) != (manifest.model_id, manifest.dim):
        raise ModelMismatch(
            f"collection {options.collection!r} holds {info.dim}-d vectors of model "
            f"{info.model_id!r}; the bundle is {manifest.model_id!r} ({manifest.dim}-d)"
        )


def _drop_existing(
    existing: ExistingIds, collection: str, tables: list[pa.Table]
) -> tuple[list[pa.Table], int]:
    """The tables without the rows whose (given) id is already stored, and how many those
    were. Rows without an id are hashed by the actors and checked before their write."""
    kept, skipped = [], 0
    for table in tables:
        ids = [i for i in table["id"].to_pylist() if i]
        found = existing(collection, ids) if ids else set()
        remaining = table
        if found:
            mask = pa.array([i not in found for i in table["id"].to_pylist()], pa.bool_())
            skipped += table.num_rows - mask.true_count
            remaining = table.filter(mask)
        if remaining.num_rows:
            kept.append(remaining)
    return kept, skipped


def _encode_and_write(
    options: BulkOptions,
    settings: Settings,
    tables: list[pa.Table],
    sink: Sink,
    summary: BulkSummary,
    *,
    started: float,
) -> None:
    total = sum(table.num_rows for table in tables)
    if total == 0:
        return
    connect(options.ray_address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # One block per actor call: a block goes to one actor, so fewer blocks than actors
    # would leave actors idle.
    dataset = ray.data.from_arrow(_blocks(tables, options.batch_size)).map_batches(
        EncodeActor,
        fn_constructor_kwargs={
            "settings": settings,
            "decode_threads": max(2, int(options.cpus_per_actor)),
        },
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
    )
    progress = _progress(total, options.progress)
    steady_start = 0
    try:
        batches = dataset.iter_batches(
            batch_size=options.write_batch, batch_format="pyarrow", prefetch_batches=2
        )
        for batch in cast(Iterator[pa.Table], batches):
            outcome = sink.write(batch)
            summary.add(outcome)
            if not summary.steady_from_s:
                summary.steady_from_s = time.perf_counter() - started
                steady_start = summary.total
            summary.steady_items = summary.total - steady_start
            if progress is not None:
                progress.update(batch.num_rows)
                progress.set_postfix(ok=summary.ok, failed=summary.failed, refresh=False)
    finally:
        if progress is not None:
            progress.close()


def _blocks(tables: list[pa.Table], rows: int) -> list[pa.Table]:
    """`tables` cut into tables of at most `rows` rows, each holding its own buffers (a
    slice would carry its parent's buffers into the object store)."""
    return [
        pa.Table.from_pylist(table.slice(start, rows).to_pylist(), schema=table.schema)
        for table in tables
        for start in range(0, table.num_rows, rows)
    ]


def connect(address: str = "", num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local Ray instance (unless this process
    is already connected). A local instance's workers import the same clipsearch as this
    process (its folder goes first on their PYTHONPATH); `num_cpus` caps a local instance."""
    if ray.is_initialized():
        return
    if not address:
        package_root = str(Path(clipsearch.__file__).resolve().parent.parent)
        paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(
                address=address or None,
                num_cpus=None if address else num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                configure_logging=True,
            )
            return
        except ConnectionError as exc:
            raise ConfigurationError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
        except Exception as exc:
            # Ray gives a starting node a fixed 30 s to register; on a busy machine a second
            # try usually makes it.
            if address or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            if attempt == LOCAL_START_ATTEMPTS:
                raise ConfigurationError(
                    f"the local Ray instance did not start ({attempt} tries): {exc}"
                ) from exc
            log.warning("the local Ray instance did not start in time; trying again")


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, desc="bulk")
