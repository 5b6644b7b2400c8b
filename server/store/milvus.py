"""`MilvusStore`: the `VectorStore` on Milvus through pymilvus's `MilvusClient`.

`uri` is a local path ending in `.db` (Milvus Lite, embedded in this process) or
`http://host:19530` (a Milvus server or cluster, with `token` = "user:password" or an API
key). Both get the same layout, so the same tests run on both.

Layout. Milvus 2.3 allows one vector field per collection, so a clipsearch collection `C` is
two Milvus collections with the same scalar fields (`id` VARCHAR primary key, `uri`,
`caption`, `metadata` JSON), so a filter means the same on both:
  - `C` holds every item with its `image_vector`;
  - `C__captions` holds the items that have a caption, with their `caption_vector`.
`C` carries the properties `clipsearch.model_id` and `clipsearch.layout`; the vector
dimension is in its schema. It is created after `C__captions` and dropped before it, so a
`C` that exists is complete; collections without the properties are not ours and are left
alone. A reopened store loads its collections before serving.

Consistency. Reads use Session consistency: a search, get or count sees every write this
process made before it (pymilvus keeps the timestamp of the last write per collection and
the server waits for it), which is the read-your-writes the service needs after it has
acknowledged an upsert. Strong would wait for the newest timestamp on every read, about
0.2 s per search on Milvus 2.3 standalone even with no write in flight; Session waits only
while this process's own writes are not yet searchable (up to one time tick, ~0.2 s, for
the first read after a write). Milvus 2.3 gives deletes no timestamp, so after a delete
reads of that collection are Strong until one has completed (`consistency`). Writes made
by other processes become visible as the server catches up (bounded staleness). Milvus
Lite applies every write before acknowledging it, so every level reads the same there.

Upserting an item without a caption deletes its caption vector without first asking
whether it has one (such a read would wait for this process's earlier writes: 0.2 s per
batch on a server).

Threads. The store is safe to call from several threads. pymilvus's client is a gRPC
channel, safe for concurrent calls. Milvus Lite 3.2 does not serialize concurrent writes
to one collection (sequence numbers and WAL appends are unguarded), and `delete` must know
which ids existed just before deleting them, so every DDL call and delete of one store
takes one lock, and so does every upsert into Milvus Lite; reads run concurrently. Upserts
into a Milvus server skip the lock (the server orders concurrent writes itself) and send
the image rows and the caption rows at once: a write there is mostly waiting for the
server, so an ingest runs several upserts in flight (`ingest_write_concurrency`).

Errors. Every pymilvus exception becomes a domain error (see `milvus_errors`); every call
carries a timeout, so an unreachable Milvus answers Unavailable instead of hanging. The
token is never logged or put in a message. An upsert is several Milvus calls; if one fails
after an earlier one was applied, the write's outcome is unknown and it raises Unavailable
(retry it; an upsert by id is idempotent), never an error that would say "not written".

Faults. `check_health()` is the server's periodic probe: Unavailable while Milvus does not
answer, StorageFull while writes fail for lack of disk space; it loads any collection it
finds released, so after a Milvus restart the collections are loaded in the background
(25-30 s on Milvus 2.3) instead of by the first search. A restarted Milvus says a collection
is loaded while it still replays its recent writes, and answers reads that do not wait for a
timestamp from what it has replayed so far (Count 0 for seconds); so on opening, and on the
first probe that succeeds after an outage, reads turn Strong until one has completed.
Milvus Lite empties its memtable before it writes a flush, so a flush that fails for lack of
space would hide acknowledged rows from reads until the file is reopened: Lite collections
are flushed only while the disk has room for it (their WAL twice over, plus a margin).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient

from clipsearch.server import limits
from clipsearch.server.errors import (
    AlreadyExists,
    ClipsearchError,
    InvalidInput,
    ModelMismatch,
    NotFound,
    StorageFull,
    Unavailable,
)
from clipsearch.server.limits import is_milvus_lite
from clipsearch.server.settings import Settings
from clipsearch.server.store import expressions, milvus_errors, validation
from clipsearch.server.store.api import (
    CollectionInfo,
    StoredItem,
    StoreHit,
    Target,
)
from clipsearch.server.store.consistency import SESSION, ReadConsistency
from clipsearch.server.store.indexing import IndexConfig, check_window, search_params
from clipsearch.server.store.lite import FLUSH_EVERY_ROWS, LiteDatabase, MemtableFlusher

log = logging.getLogger(__name__)

T = TypeVar("T")

PROPERTY_MODEL_ID = "clipsearch.model_id"
PROPERTY_LAYOUT = "clipsearch.layout"
LAYOUT_VERSION = "1"
IMAGE_VECTOR = "image_vector"
CAPTION_VECTOR = "caption_vector"
SCALAR_FIELDS = ("id", "uri", "caption", "metadata")
ROWS_PER_WRITE = 512
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_DDL_TIMEOUT_S = 120.0
FLUSH_HEADROOM_BYTES = 1 << 20
DISK_FULL_RECHECK_S = 30.0  # a Milvus server's disk cannot be measured from here


@dataclass(frozen=True)
class _Collection:
    """What the store knows about one clipsearch collection."""

    name: str
    dim: int
    model_id: str
    index: IndexConfig

    @property
    def companion(self) -> str:
        return companion_name(self.name)


def companion_name(name: str) -> str:
    return name + validation.COMPANION_SUFFIX


class MilvusStore:
    def __init__(
        self,
        uri: str,
        *,
        token: str = "",
        index: IndexConfig | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ddl_timeout_s: float = DEFAULT_DDL_TIMEOUT_S,
        lite_flush_rows: int = FLUSH_EVERY_ROWS,
    ) -> None:
        """Connect (or open the Milvus Lite file) and load every clipsearch collection.

        `index` applies to collections created from now on; each existing collection keeps
        its own index, read back from Milvus. `lite_flush_rows`: see `lite`. Raises
        Unavailable when Milvus cannot be reached, ConfigurationError for a Milvus Lite path
        that does not end in `.db`."""
        self._index = index or IndexConfig.defaults_for("HNSW", "IP")
        self._timeout_s = timeout_s
        self._ddl_timeout_s = ddl_timeout_s
        self._write_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._collections: dict[str, _Collection] = {}
        self._reads = ReadConsistency()
        self._closed = False
        self._disk_full: tuple[float, int] | None = None  # (when, free bytes then)
        self._lite = LiteDatabase.open(uri) if is_milvus_lite(uri) else None
        self._flusher = (
            MemtableFlusher(self._flush_idle, every_rows=lite_flush_rows) if self._lite else None
        )
        self._upsert_lock: contextlib.AbstractContextManager[object] = (
            self._write_lock if self._lite else contextlib.nullcontext()
        )
        # The caption rows of a server upsert go from here while the image rows go from the
        # caller's thread.
        self._companion_writer = (
            None if self._lite else ThreadPoolExecutor(4, thread_name_prefix="milvus-captions")
        )
        self._description = str(self._lite.path) if self._lite else _redacted(uri)
        try:
            self._client = MilvusClient(
                uri=self._lite.uri if self._lite else uri, token=token, timeout=timeout_s
            )
        except Exception as exc:
            if self._lite:
                self._lite.release()
            raise Unavailable(
                f"cannot open Milvus at {self._description}: {milvus_errors.message_of(exc)}"
                + (" (is another process using this file?)" if self._lite else "")
            ) from exc
        # Set when Milvus could not be reached: it may have restarted, see `_load_all`.
        self._contact_lost = False
        try:
            self._load_all(settle=True)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> MilvusStore:
        index = IndexConfig.from_strings(
            settings.index_type, settings.metric, settings.index_params, settings.search_params
        )
        return cls(settings.milvus_uri, token=settings.milvus_token, index=index)

    def __repr__(self) -> str:
        return f"MilvusStore({self._description!r})"

    # --- collections ---------------------------------------------------------------------

    def create_collection(self, name: str, dim: int, model_id: str, exist_ok: bool = False) -> bool:
        validation.check_collection_name(name)
        validation.check_dim(dim)
        validation.check_model_id(model_id)
        with self._write_lock:
            if self._call(lambda: self._client.has_collection(name, timeout=self._timeout_s)):
                try:
                    existing = self._collection(name)
                except NotFound:
                    raise AlreadyExists(
                        f"a Milvus collection {name!r} exists and was not made by clipsearch"
                    ) from None
                if not exist_ok:
                    raise AlreadyExists(f"collection {name!r} already exists")
                if (existing.dim, existing.model_id) != (dim, model_id):
                    raise ModelMismatch(
                        f"collection {name!r} holds {existing.dim}-d vectors of model "
                        f"{existing.model_id!r}, not {dim}-d vectors of {model_id!r}"
                    )
                return False
            self._create(name, dim, model_id)
            return True

    def _create(self, name: str, dim: int, model_id: str) -> None:
        companion = companion_name(name)
        properties = {PROPERTY_MODEL_ID: model_id, PROPERTY_LAYOUT: LAYOUT_VERSION}
        try:
            # A companion without its main collection is left over from a failed create.
            self._drop_if_exists(companion)
            self._create_one(companion, CAPTION_VECTOR, dim, {})
            self._create_one(name, IMAGE_VECTOR, dim, properties)
            # Loading takes seconds on a Milvus server: load both at once, then wait for both.
            self._call(
                lambda: self._client.load_collection(
                    companion, _async=True, timeout=self._timeout_s
                ),
                name,
            )
            for loaded in (name, companion):
                load = partial(self._client.load_collection, loaded, timeout=self._ddl_timeout_s)
                self._call(load, name)
        except BaseException:
            for leftover in (name, companion):
                try:
                    self._drop_if_exists(leftover)
                except Exception:  # the create's own error is the one to report
                    log.warning("could not clean up %s after a failed create", leftover)
            raise
        with self._cache_lock:
            self._collections[name] = _Collection(name, dim, model_id, self._index)

    def _create_one(
        self, name: str, vector_field: str, dim: int, properties: dict[str, str]
    ) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=limits.MAX_ID_BYTES)
        schema.add_field("uri", DataType.VARCHAR, max_length=limits.MAX_URI_BYTES)
        schema.add_field("caption", DataType.VARCHAR, max_length=limits.MAX_CAPTION_BYTES)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field(vector_field, DataType.FLOAT_VECTOR, dim=dim)
        index_params = MilvusClient.prepare_index_params()
        index_params.add_index(
            field_name=vector_field,
            index_type=self._index.index_type,
            metric_type=self._index.metric,
            params=dict(self._index.build_params),
        )
        self._call(
            lambda: self._client.create_collection(
                name,
                schema=schema,
                consistency_level=SESSION,
                properties=properties,
                timeout=self._ddl_timeout_s,
            ),
            name,
        )
        # Not waiting for the (empty) index to build avoids a poll Milvus Lite does not
        # implement; loading the collection waits for everything it needs.
        self._call(
            lambda: self._client.create_index(
                name, index_params, sync=False, timeout=self._ddl_timeout_s
            ),
            name,
        )

    def _drop_if_exists(self, name: str) -> None:
        if self._call(lambda: self._client.has_collection(name, timeout=self._timeout_s)):
            self._call(lambda: self._client.drop_collection(name, timeout=self._ddl_timeout_s))

    def drop_collection(self, name: str) -> None:
        validation.check_collection_name(name)
        with self._write_lock:
            self._collection(name)  # NotFound, also for a collection clipsearch did not make
            with self._cache_lock:
                self._collections.pop(name, None)
            self._call(lambda: self._client.drop_collection(name, timeout=self._ddl_timeout_s))
            self._drop_if_exists(companion_name(name))
            for forgotten in (name, companion_name(name)):
                self._reads.forget(forgotten)
                if self._flusher:
                    self._flusher.flushed(forgotten)

    def list_collections(self) -> list[CollectionInfo]:
        names = self._call(lambda: self._client.list_collections(timeout=self._timeout_s))
        infos = []
        for name in sorted(names):
            if name.endswith(validation.COMPANION_SUFFIX):
                continue
            try:
                infos.append(self.describe(name))
            except NotFound:  # not ours, or dropped meanwhile
                continue
        return infos

    def describe(self, name: str) -> CollectionInfo:
        collection = self._collection(name)
        return CollectionInfo(name, collection.dim, collection.model_id, self.count(name))

    # --- items ---------------------------------------------------------------------------

    def upsert(self, name: str, items: Sequence[StoredItem]) -> None:
        collection = self._collection(name)
        for item in items:
            validation.check_id(item.id)
        latest = {item.id: item for item in items}  # the last version of an id wins
        image_rows, caption_rows, without_caption = [], [], []
        for item in validation.check_items(list(latest.values()), collection.dim):
            image_row, caption_row = _rows(item)
            image_rows.append(image_row)
            if caption_row is None:
                without_caption.append(item.id)
            else:
                caption_rows.append(caption_row)
        with self._upsert_lock:
            # Old caption vectors go first, without asking which exist (a read here would wait
            # for this process's earlier writes to become searchable: ~0.2 s per batch on a
            # server); the caption upserts that follow make the deletes visible to Session reads.
            self._delete_ids(
                collection,
                collection.companion,
                without_caption,
                followed_by_write=bool(caption_rows),
            )
            # One entry per write that went through: a later failure leaves the outcome open.
            applied = [True] if without_caption else []
            try:
                self._upsert_both(collection, image_rows, caption_rows, applied)
            except BaseException as exc:
                if without_caption and caption_rows:
                    self._reads.deleted(collection.companion)
                if applied and isinstance(exc, ClipsearchError) and not _outcome_open(exc):
                    raise Unavailable(
                        f"the write was applied in part, then failed ({exc}); its outcome is "
                        "unknown: retry it"
                    ) from exc
                raise
        self._disk_full = None

    def _upsert_both(
        self,
        collection: _Collection,
        image_rows: list[dict[str, Any]],
        caption_rows: list[dict[str, Any]],
        applied: list[bool],
    ) -> None:
        """The image rows into the collection, the caption rows into its companion: one
        after the other on Milvus Lite, at once on a server. Returns when both are written;
        raises the first error (the image rows' if both failed). Appends to `applied` after
        each batch written."""

        def captions() -> None:
            for rows in _batches(caption_rows):
                self._upsert_rows(collection, collection.companion, rows)
                applied.append(True)

        pending, error = None, None
        if self._companion_writer is not None and caption_rows:
            pending = self._companion_writer.submit(captions)
        try:
            for rows in _batches(image_rows):
                self._upsert_rows(collection, collection.name, rows)
                applied.append(True)
        finally:
            if pending is not None:
                error = pending.exception()  # waits: nothing is left in flight on any path
        if pending is None:
            captions()
        elif error is not None:
            raise error

    def get(self, name: str, ids: Sequence[str], include_vectors: bool = False) -> list[StoredItem]:
        collection = self._collection(name)
        wanted = _unique_ids(ids)
        fields = [*SCALAR_FIELDS, IMAGE_VECTOR] if include_vectors else list(SCALAR_FIELDS)
        rows = {row["id"]: row for row in self._query_ids(collection, name, wanted, fields)}
        caption_vectors: dict[str, np.ndarray] = {}
        if include_vectors and rows:
            found = [i for i in wanted if i in rows]
            caption_rows = self._query_ids(
                collection, collection.companion, found, ["id", CAPTION_VECTOR]
            )
            caption_vectors = {row["id"]: _vector(row[CAPTION_VECTOR]) for row in caption_rows}
        return [
            StoredItem(
                id=i,
                uri=rows[i]["uri"],
                caption=rows[i]["caption"],
                metadata=dict(rows[i]["metadata"] or {}),
                image_vector=_vector(rows[i][IMAGE_VECTOR]) if include_vectors else None,
                caption_vector=caption_vectors.get(i),
            )
            for i in wanted
            if i in rows
        ]

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        collection = self._collection(name)
        return {row["id"] for row in self._query_ids(collection, name, _unique_ids(ids), ["id"])}

    def delete(self, name: str, ids: Sequence[str]) -> int:
        collection = self._collection(name)
        wanted = _unique_ids(ids)
        with self._write_lock:
            existing = [row["id"] for row in self._query_ids(collection, name, wanted, ["id"])]
            self._delete_ids(collection, name, existing)
            self._delete_ids(collection, collection.companion, existing)
        return len(existing)

    def count(self, name: str, filter: str = "") -> int:
        expressions.check_filter(filter)
        collection = self._collection(name)

        def count_at(level: str) -> list[dict[str, Any]]:
            return self._client.query(  # type: ignore[no-any-return]
                name,
                filter=filter,
                output_fields=["count(*)"],
                consistency_level=level,
                timeout=self._timeout_s,
            )

        return int(self._read(collection, name, count_at, filter)[0]["count(*)"])

    def search(
        self,
        name: str,
        vector: np.ndarray,
        target: Target,
        top_k: int,
        *,
        offset: int = 0,
        filter: str = "",
        output_fields: Sequence[str] = (),
        params: Mapping[str, float] | None = None,
        exclude_ids: Sequence[str] = (),
    ) -> list[StoreHit]:
        check_window(top_k, offset)
        collection = self._collection(name)
        query = validation.unit_vector(vector, collection.dim, "query vector")
        fields = validation.output_fields(output_fields)
        expression = expressions.all_of(
            expressions.check_filter(filter), expressions.excluding(_unique_ids(exclude_ids))
        )
        if target is Target.IMAGE:
            searched, anns_field = collection.name, IMAGE_VECTOR
        else:
            searched, anns_field = collection.companion, CAPTION_VECTOR
        settings = {
            "metric_type": collection.index.metric,
            "params": search_params(collection.index, top_k, offset, params),
        }

        def search_at(level: str) -> list[list[dict[str, Any]]]:
            return self._client.search(  # type: ignore[no-any-return]
                searched,
                data=[query],
                filter=expression,
                limit=top_k,
                offset=offset,
                output_fields=list(fields),
                search_params=settings,
                anns_field=anns_field,
                consistency_level=level,
                timeout=self._timeout_s,
            )

        results = self._read(collection, searched, search_at, filter)
        return [_hit(hit, fields) for hit in results[0]]

    def check_health(self) -> None:
        """The server's probe: raises Unavailable while Milvus does not answer, StorageFull
        while writes fail for lack of disk space; loads the collections found released."""
        settle, self._contact_lost = self._contact_lost, False
        try:
            self._load_all(settle=settle)
        except BaseException:
            self._contact_lost = self._contact_lost or settle
            raise
        full = self._disk_full
        if full is None:
            return
        since, free_then = full
        if self._lite is not None:
            if _free_bytes(self._lite.path) < free_then + FLUSH_HEADROOM_BYTES:
                raise StorageFull(f"the disk of {self._description} is full")
        elif time.monotonic() - since < DISK_FULL_RECHECK_S:
            raise StorageFull("the vector store's disk was full at the last write")
        self._disk_full = None

    def close(self) -> None:
        if self._closed:
            return
        if self._flusher:
            self._flusher.close()
        if self._companion_writer:
            self._companion_writer.shutdown(wait=True)
        self._closed = True
        try:
            self._client.close()
        except Exception as exc:
            log.warning("closing the Milvus client failed: %s", milvus_errors.message_of(exc))
        if self._lite:
            self._lite.release()

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------

    def _collection(self, name: str) -> _Collection:
        """The collection's dim, model and index: cached, read from Milvus on first use."""
        with self._cache_lock:
            cached = self._collections.get(name)
        if cached is not None:
            return cached
        if isinstance(name, str) and name.endswith(validation.COMPANION_SUFFIX):
            raise NotFound(f"collection {name!r} does not exist")
        validation.check_collection_name(name)
        description = self._call(
            lambda: self._client.describe_collection(name, timeout=self._timeout_s), name
        )
        properties = description.get("properties") or {}
        vector_fields = [f for f in description["fields"] if f["name"] == IMAGE_VECTOR]
        if PROPERTY_MODEL_ID not in properties or not vector_fields:
            raise NotFound(f"collection {name!r} was not created by clipsearch")
        index = self._call(
            lambda: self._client.describe_index(name, IMAGE_VECTOR, timeout=self._timeout_s), name
        )
        index_type, metric = index.get("index_type", ""), index.get("metric_type", "")
        if index_type == self._index.index_type and metric == self._index.metric:
            config = self._index
        else:
            config = IndexConfig.observed(index_type, metric)
        collection = _Collection(
            name, int(vector_fields[0]["params"]["dim"]), str(properties[PROPERTY_MODEL_ID]), config
        )
        with self._cache_lock:
            self._collections[name] = collection
        return collection

    def _load_all(self, settle: bool = False) -> None:
        """Load every collection of ours. `settle` (on opening, and once Milvus answers again
        after an outage): a Milvus server that restarted reports its collections loaded while
        it still replays their recent writes, and Session reads of a process that has not
        written them answer from what it has so far (Count 0 for seconds); so reads turn
        Strong until one has completed, and one is made here, which waits for the replay.
        The listing takes the DDL timeout: Milvus Lite opens every collection of its file on
        the first listing, which took over 10 s at ~870k rows."""
        listing = partial(self._client.list_collections, timeout=self._ddl_timeout_s)
        for name in self._call(listing):
            if name.endswith(validation.COMPANION_SUFFIX):
                continue
            try:
                collection = self._collection(name)
            except NotFound:
                continue
            for part in (collection.name, collection.companion):
                self._ensure_loaded(part)
                if settle and self._lite is None:
                    self._reads.unsettled(part)
                    self._read(collection, part, partial(self._count_at, part))

    def _count_at(self, name: str, level: str) -> list[dict[str, Any]]:
        return self._client.query(  # type: ignore[no-any-return]
            name, filter="", output_fields=["count(*)"], consistency_level=level,
            timeout=self._ddl_timeout_s,
        )  # fmt: skip

    def _ensure_loaded(self, name: str) -> None:
        state = self._call(
            lambda: self._client.get_load_state(name, timeout=self._ddl_timeout_s), name
        )
        if getattr(state.get("state"), "name", "") != "Loaded":
            log.info("loading collection %s", name)
            self._call(
                lambda: self._client.load_collection(name, timeout=self._ddl_timeout_s), name
            )

    def _upsert_rows(self, collection: _Collection, name: str, rows: list[dict[str, Any]]) -> None:
        """Upsert into the Milvus collection `name` (`collection` or its companion)."""
        self._call(
            partial(self._client.upsert, name, rows, timeout=self._timeout_s), collection.name
        )
        if self._flusher and self._flusher.written(name, len(rows)) and self._room_to_flush(name):
            try:
                self._call(partial(self._client.flush, name, timeout=self._ddl_timeout_s), name)
                self._flusher.flushed(name)
            except ClipsearchError as exc:  # the rows are written; flushing only speeds reads
                log.warning("flushing %s failed (will retry): %s", name, exc)

    def _flush_idle(self, name: str) -> None:
        """Flush the Milvus Lite collection `name` (called by the idle flusher's thread)."""
        with self._write_lock:
            if not self._room_to_flush(name):
                raise StorageFull(f"no room to flush {name}")  # the flusher tries again later
            self._call(partial(self._client.flush, name, timeout=self._ddl_timeout_s), name)
            if self._flusher:
                self._flusher.flushed(name)

    def _room_to_flush(self, name: str) -> bool:
        """Whether the disk can take a flush of the Milvus Lite collection `name`: a flush
        that fails for lack of space hides the memtable's rows until the file is reopened."""
        if self._lite is None:
            return True
        wal = self._lite.path / "collections" / name / "wal"
        try:
            pending = sum(f.stat().st_size for f in wal.iterdir() if f.is_file())
        except OSError:
            pending = 0
        room = _free_bytes(self._lite.path) >= 2 * pending + FLUSH_HEADROOM_BYTES
        if not room:
            log.warning("not flushing %s: the disk is nearly full", name)
        return room

    def _delete_ids(
        self,
        collection: _Collection,
        name: str,
        ids: Sequence[str],
        *,
        followed_by_write: bool = False,
    ) -> None:
        """Delete `ids` from the Milvus collection `name` (`collection` or its companion).

        `followed_by_write`: the caller writes to `name` next, which makes Session reads see
        these deletes; otherwise reads turn Strong until they do (see `consistency`)."""
        for chunk in expressions.chunks(ids):
            expression = expressions.ids_in(chunk)
            self._call(
                partial(self._client.delete, name, filter=expression, timeout=self._timeout_s),
                collection.name,
            )
            if not followed_by_write:
                self._reads.deleted(name)

    def _query_ids(
        self, collection: _Collection, name: str, ids: Sequence[str], fields: list[str]
    ) -> list[dict[str, Any]]:
        """The rows of the Milvus collection `name` whose id is in `ids`."""
        for item_id in ids:
            validation.check_id(item_id)
        rows: list[dict[str, Any]] = []
        for chunk in expressions.chunks(ids):
            expression = expressions.ids_in(chunk)

            def query_at(level: str, expression: str = expression) -> list[dict[str, Any]]:
                return self._client.query(  # type: ignore[no-any-return]
                    name,
                    filter=expression,
                    output_fields=fields,
                    consistency_level=level,
                    timeout=self._timeout_s,
                )

            rows += self._read(collection, name, query_at)
        return rows

    def _read(
        self, collection: _Collection, name: str, call: Callable[[str], T], filter: str = ""
    ) -> T:
        """Run a read of the Milvus collection `name` at the level it needs (see
        `consistency`); a collection found released is loaded and the read tried again."""
        level = self._reads.level(name)
        result = self._call(partial(call, level.level), collection.name, filter, reload=True)
        self._reads.completed(name, level)
        return result

    def _call(
        self, call: Callable[[], T], collection: str = "", filter: str = "", reload: bool = False
    ) -> T:
        """Run one pymilvus call; domain errors out. `reload`: a read that finds its
        collection released (someone else released it) loads it and tries once more."""
        if self._closed:
            raise Unavailable("the vector store is closed")
        try:
            return call()
        except Exception as exc:
            if reload and milvus_errors.is_not_loaded(exc):
                self._ensure_loaded(collection)
                self._ensure_loaded(companion_name(collection))
                return self._call(call, collection, filter)
            if milvus_errors.is_collection_not_found(exc):
                with self._cache_lock:
                    self._collections.pop(collection, None)
            error = milvus_errors.translate(exc, collection, filter)
            if isinstance(error, Unavailable):
                self._contact_lost = True
            if isinstance(error, StorageFull) and self._disk_full is None:
                free = _free_bytes(self._lite.path) if self._lite else 0
                self._disk_full = (time.monotonic(), free)
                log.error("%s", error)
            raise error from exc


def _outcome_open(exc: ClipsearchError) -> bool:
    """Errors that already leave a write's outcome open (or end the stream): not wrapped."""
    return isinstance(exc, (Unavailable, StorageFull))


def _free_bytes(path: Any) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _rows(item: StoredItem) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checked item's row in the main collection and, if it has a caption vector, in
    the companion."""
    scalars = {"id": item.id, "uri": item.uri, "caption": item.caption, "metadata": item.metadata}
    image_row = {**scalars, IMAGE_VECTOR: item.image_vector}
    if item.caption_vector is None:
        return image_row, None
    return image_row, {**scalars, CAPTION_VECTOR: item.caption_vector}


def _batches(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [rows[i : i + ROWS_PER_WRITE] for i in range(0, len(rows), ROWS_PER_WRITE)]


def _unique_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidInput("ids must be a list of strings, not one string")
    return list(dict.fromkeys(ids))


def _vector(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _hit(hit: Mapping[str, Any], fields: tuple[str, ...]) -> StoreHit:
    entity = hit.get("entity") or {}
    return StoreHit(
        id=str(hit["id"]),
        score=float(hit["distance"]),
        uri=entity.get("uri", "") if "uri" in fields else "",
        caption=entity.get("caption", "") if "caption" in fields else "",
        metadata=dict(entity.get("metadata") or {}) if "metadata" in fields else {},
    )


def _redacted(uri: str) -> str:
    """`uri` without credentials (http://user:password@host -> http://host)."""
    scheme, sep, rest = uri.partition("://")
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}{sep}{host}" if sep else uri
