"""MilvusStore against real Milvus: Milvus Lite (temp dir) and, marked slow, a real Milvus 2.3
server (`milvus-server` from the PyPI package `milvus`, started once per session).

Every test runs on both backends, except those about one backend's own behaviour.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient
from store_fixtures import (
    MilvusServerProcess,
    free_port,
    stored_items,
    unit_vectors,
)

from clipsearch.server.errors import (
    AlreadyExists,
    ConfigurationError,
    InvalidFilter,
    InvalidInput,
    NotFound,
    Unavailable,
)
from clipsearch.server.settings import Settings
from clipsearch.server.store import (
    IndexConfig,
    MilvusStore,
    StoredItem,
    Target,
)
from clipsearch.server.store.consistency import ReadConsistency
from clipsearch.server.store.lite import LiteDatabase, MemtableFlusher

DIM = 16
GALLERY_SIZE = 200
COLOURS = ("red", "green", "blue")
BACKENDS = ["lite", pytest.param("server", marks=pytest.mark.slow)]


# --- backends ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    kind: str
    uri: str
    scratch: Path

    def fresh_uri(self) -> str:
        """A URI whose data no other store of this test has open (for reopen tests)."""
        if self.kind == "lite":
            return str(self.scratch / f"{uuid.uuid4().hex[:8]}.db")
        return self.uri

    def endpoint(self) -> str:
        """Where another pymilvus client of this process reaches the open database."""
        return LiteDatabase.endpoint(self.uri) if self.kind == "lite" else self.uri


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    scratch = tmp_path_factory.mktemp(f"store-{request.param}")
    if request.param == "lite":
        return Backend("lite", str(scratch / "milvus.db"), scratch)
    server: MilvusServerProcess = request.getfixturevalue("milvus_server")
    return Backend("server", server.uri, scratch)


@pytest.fixture
def store(backend: Backend) -> Iterator[MilvusStore]:
    store = MilvusStore(backend.uri)
    yield store
    store.close()


@pytest.fixture
def name(store: MilvusStore) -> Iterator[str]:
    """A fresh collection name, dropped after the test."""
    collection = f"t_{uuid.uuid4().hex[:10]}"
    yield collection
    with contextlib.suppress(NotFound):
        store.drop_collection(collection)


def items(ids: list[str], seed: int, captioned: bool = True, dim: int = DIM) -> list[StoredItem]:
    return stored_items(ids, seed, dim, captioned)


# --- a read-only gallery shared by the search tests ---------------------------------------


@dataclass(frozen=True)
class Gallery:
    store: MilvusStore
    name: str
    ids: list[str]
    images: np.ndarray
    captions: np.ndarray  # rows of uncaptioned items are zero
    colours: list[str]

    def expected(
        self, query: np.ndarray, target: Target, keep: np.ndarray | None = None
    ) -> list[str]:
        """Ids by descending cosine, computed with numpy."""
        vectors = self.images if target is Target.IMAGE else self.captions
        scores = vectors @ query
        candidates = np.ones(len(self.ids), bool) if keep is None else keep.copy()
        if target is Target.CAPTION:
            candidates &= np.abs(self.captions).sum(axis=1) > 0
        order = [i for i in np.argsort(-scores, kind="stable") if candidates[i]]
        return [self.ids[i] for i in order]


@pytest.fixture(scope="module")
def gallery(backend: Backend) -> Iterator[Gallery]:
    store = MilvusStore(backend.uri)
    name = f"gallery_{uuid.uuid4().hex[:8]}"
    store.create_collection(name, DIM, "test-model")
    ids = [f"img-{i:03d}" for i in range(GALLERY_SIZE)]
    images = unit_vectors(GALLERY_SIZE, DIM, seed=10)
    captions = unit_vectors(GALLERY_SIZE, DIM, seed=11)
    captions[1::2] = 0.0  # odd items have no caption
    colours = [COLOURS[i % 3] for i in range(GALLERY_SIZE)]
    store.upsert(
        name,
        [
            StoredItem(
                id=ids[i],
                uri=f"s3://bucket/{colours[i]}/{i}.jpg",
                caption=f"a {colours[i]} thing number {i}" if i % 2 == 0 else "",
                metadata={
                    "colour": colours[i],
                    "rank": i,
                    "tags": ["even" if i % 2 == 0 else "odd"],
                },
                image_vector=images[i],
                caption_vector=captions[i] if i % 2 == 0 else None,
            )
            for i in range(GALLERY_SIZE)
        ],
    )
    yield Gallery(store, name, ids, images, captions, colours)
    store.drop_collection(name)
    store.close()


# --- collections --------------------------------------------------------------------------


def test_foreign_collections_are_left_alone(backend: Backend, store: MilvusStore) -> None:
    foreign = f"foreign_{uuid.uuid4().hex[:8]}"
    client = MilvusClient(backend.endpoint())  # on Lite, the same database as `store`
    client.create_collection(foreign, dimension=DIM)
    try:
        assert foreign not in {info.name for info in store.list_collections()}
        with pytest.raises(NotFound, match="not created by clipsearch"):
            store.describe(foreign)
        with pytest.raises(AlreadyExists, match="not made by clipsearch"):
            store.create_collection(foreign, DIM, "m", exist_ok=True)
        with pytest.raises(NotFound):
            store.drop_collection(foreign)
    finally:
        client.drop_collection(foreign)
        client.close()


# --- writes and reads ---------------------------------------------------------------------


def test_concurrent_upserts_count_exactly_with_every_caption_vector_in_place(
    store: MilvusStore, name: str
) -> None:
    store.create_collection(name, DIM, "m")
    batches = [items([f"t{t}-{i}" for i in range(40)], seed=10 + t) for t in range(4)]
    errors: list[BaseException] = []

    def write(batch: list[StoredItem]) -> None:
        try:
            store.upsert(name, batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.count(name) == 160
    expected = {item.id: item for batch in batches for item in batch}
    got = store.get(name, list(expected), include_vectors=True)
    assert len(got) == 160
    for item in got:
        np.testing.assert_array_equal(item.image_vector, expected[item.id].image_vector)  # type: ignore[arg-type]
        np.testing.assert_array_equal(item.caption_vector, expected[item.id].caption_vector)  # type: ignore[arg-type]


def test_ids_with_quotes_backslashes_and_unicode(store: MilvusStore, name: str) -> None:
    store.create_collection(name, DIM, "m")
    odd = ["it's", 'say "hi"', "back\\slash", "日本語/é", "x]) or (true"]
    store.upsert(name, items(odd, seed=7))
    assert [item.id for item in store.get(name, odd)] == odd
    assert store.existing_ids(name, odd) == set(odd)
    assert store.delete(name, odd[:2]) == 2
    assert store.existing_ids(name, odd) == set(odd[2:])


# --- search -------------------------------------------------------------------------------


def test_filters_on_scalar_and_json_fields(gallery: Gallery) -> None:
    query = unit_vectors(1, DIM, seed=97)[0]
    colours = np.array(gallery.colours)
    ranks = np.arange(GALLERY_SIZE)
    cases = {
        'metadata["colour"] == "red"': colours == "red",
        'uri like "s3://bucket/blue/%"': colours == "blue",
        'metadata["rank"] < 30 and metadata["colour"] != "green"': (ranks < 30)
        & (colours != "green"),
        'id in ["img-005", "img-006", "img-150"]': np.isin(ranks, [5, 6, 150]),
        'caption like "a green%"': (colours == "green") & (ranks % 2 == 0),
    }
    for expression, keep in cases.items():
        hits = gallery.store.search(gallery.name, query, Target.IMAGE, 10, filter=expression)
        assert [hit.id for hit in hits] == gallery.expected(query, Target.IMAGE, keep)[:10], (
            expression
        )
        assert gallery.store.count(gallery.name, expression) == int(keep.sum()), expression
    red_captions = gallery.store.search(
        gallery.name, query, Target.CAPTION, 10, filter='metadata["colour"] == "red"'
    )
    expected = gallery.expected(query, Target.CAPTION, colours == "red")[:10]
    assert [hit.id for hit in red_captions] == expected
    assert gallery.store.count(gallery.name) == GALLERY_SIZE


def test_exclude_ids(gallery: Gallery) -> None:
    query = gallery.images[10]
    excluded = ["img-010", "img-000", "not-there"]
    hits = gallery.store.search(gallery.name, query, Target.IMAGE, 5, exclude_ids=excluded)
    expected = [i for i in gallery.expected(query, Target.IMAGE) if i not in excluded][:5]
    assert [hit.id for hit in hits] == expected
    red = gallery.store.search(
        gallery.name,
        query,
        Target.IMAGE,
        5,
        filter='metadata["colour"] == "red"',
        exclude_ids=["img-012"],
    )
    assert "img-012" not in {hit.id for hit in red}
    assert all(gallery.colours[int(hit.id[4:])] == "red" for hit in red)


def test_output_fields_select_what_hits_carry(gallery: Gallery) -> None:
    query = gallery.images[0]
    (uri_only,) = gallery.store.search(gallery.name, query, Target.IMAGE, 1, output_fields=["uri"])
    assert uri_only.uri == "s3://bucket/red/0.jpg"
    assert uri_only.caption == "" and uri_only.metadata == {}
    (everything,) = gallery.store.search(gallery.name, query, Target.IMAGE, 1)
    assert everything.caption == "a red thing number 0"
    assert everything.metadata == {"colour": "red", "rank": 0, "tags": ["even"]}
    with pytest.raises(InvalidInput, match="unknown output field 'vector'"):
        gallery.store.search(gallery.name, query, Target.IMAGE, 1, output_fields=["vector"])


@pytest.mark.parametrize(
    "expression",
    ['id in ["a"', "no_such_field == 1", 'uri == 3 and metadata["x"] == 1', "(((", "rank >"],
)
def test_bad_filter_is_invalid_filter_with_explanation(gallery: Gallery, expression: str) -> None:
    query = gallery.images[0]
    with pytest.raises(InvalidFilter) as search_error:
        gallery.store.search(gallery.name, query, Target.IMAGE, 3, filter=expression)
    message = str(search_error.value)
    assert expression in message and len(message) > len(expression) + 20
    with pytest.raises(InvalidFilter):
        gallery.store.count(gallery.name, expression)


def test_search_params_are_accepted(gallery: Gallery) -> None:
    query = gallery.images[3]
    hits = gallery.store.search(gallery.name, query, Target.IMAGE, 5, params={"ef": 8})
    assert hits[0].id == "img-003" and len(hits) == 5  # ef is raised to top_k + offset


# --- lifecycle, settings, concurrency -----------------------------------------------------


def test_model_and_dim_survive_closing_and_reopening(backend: Backend) -> None:
    uri = backend.fresh_uri()
    name = f"reopen_{uuid.uuid4().hex[:8]}"
    with MilvusStore(uri) as first:
        first.create_collection(name, 24, "clip-vit-b32@int8")
        first.upsert(name, items(["r1", "r2"], seed=12, dim=24))
    with MilvusStore(uri) as reopened:
        info = reopened.describe(name)
        assert (info.dim, info.model_id, info.count) == (24, "clip-vit-b32@int8", 2)
        query = items(["r1", "r2"], seed=12, dim=24)[1].image_vector
        assert reopened.search(name, query, Target.IMAGE, 1)[0].id == "r2"  # type: ignore[arg-type]
        assert reopened.create_collection(name, 24, "clip-vit-b32@int8", exist_ok=True) is False
        reopened.drop_collection(name)


def test_concurrent_upserts_and_searches(store: MilvusStore, name: str) -> None:
    store.create_collection(name, DIM, "m")
    writers, batches, batch_size, searchers = 4, 5, 16, 3
    errors: list[BaseException] = []
    done = threading.Event()

    def write(worker: int) -> None:
        try:
            for batch in range(batches):
                ids = [f"w{worker}-b{batch}-{i}" for i in range(batch_size)]
                store.upsert(name, items(ids, seed=worker * 100 + batch))
                assert store.existing_ids(name, ids) == set(ids)  # read-your-writes
        except BaseException as exc:
            errors.append(exc)

    def search(worker: int) -> None:
        try:
            query = unit_vectors(1, DIM, seed=500 + worker)[0]
            while not done.is_set():
                hits = store.search(name, query, Target.IMAGE, 5)
                assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
                store.count(name)
        except BaseException as exc:
            errors.append(exc)

    search_threads = [threading.Thread(target=search, args=(w,)) for w in range(searchers)]
    write_threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in search_threads + write_threads:
        thread.start()
    for thread in write_threads:
        thread.join(timeout=120)
    done.set()
    for thread in search_threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert store.count(name) == writers * batches * batch_size


def test_from_settings_uses_index_type_metric_and_params(tmp_path: Path) -> None:
    settings = Settings(
        milvus_uri=str(tmp_path / "settings.db"),
        index_type="IVF_FLAT",
        metric="COSINE",
        index_params='{"nlist": 4}',
        search_params='{"nprobe": 4}',
    )
    with MilvusStore.from_settings(settings) as store:
        store.create_collection("ivf", DIM, "m")
        gallery = items([f"v{i}" for i in range(40)], seed=13)
        store.upsert("ivf", gallery)
        hit = store.search("ivf", gallery[5].image_vector, Target.IMAGE, 1)[0]  # type: ignore[arg-type]
        assert hit.id == "v5" and hit.score == pytest.approx(1.0, abs=1e-5)
        index = store._client.describe_index("ivf", "image_vector")
        assert (index["index_type"], index["metric_type"]) == ("IVF_FLAT", "COSINE")


@pytest.mark.parametrize(
    ("index_type", "metric", "build_params", "search_params"),
    [
        ("FLAT", "IP", "", ""),
        ("HNSW", "COSINE", "", ""),
        ("AUTOINDEX", "IP", "", ""),
        ("IVF_FLAT", "IP", '{"nlist": 4}', '{"nprobe": 4}'),  # every cell: exact
    ],
)
def test_each_index_type_and_metric_ranks_like_numpy(
    backend: Backend, index_type: str, metric: str, build_params: str, search_params: str
) -> None:
    name = f"index_{index_type.lower()}_{uuid.uuid4().hex[:6]}"
    gallery = items([f"v{i}" for i in range(30)], seed=14)
    vectors = np.stack([item.image_vector for item in gallery])  # type: ignore[misc]
    query = unit_vectors(1, DIM, 15)[0]
    order = np.argsort(-(vectors @ query))[:5]

    def check(store: MilvusStore) -> None:
        hits = store.search(name, query, Target.IMAGE, 5)
        assert [h.id for h in hits] == [f"v{i}" for i in order]
        np.testing.assert_allclose([h.score for h in hits], (vectors @ query)[order], atol=1e-5)

    config = IndexConfig.from_strings(index_type, metric, build_params, search_params)
    with MilvusStore(backend.uri, index=config) as store:
        store.create_collection(name, DIM, "m")
        store.upsert(name, gallery)
        check(store)
    with MilvusStore(backend.uri) as reopened:  # other settings: the collection keeps its index
        try:
            check(reopened)
        finally:
            reopened.drop_collection(name)


def test_bad_settings_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="index_params"):
        MilvusStore.from_settings(
            Settings(milvus_uri=str(tmp_path / "x.db"), index_params="{not json")
        )
    with pytest.raises(ConfigurationError, match="search_params"):
        MilvusStore.from_settings(
            Settings(milvus_uri=str(tmp_path / "x.db"), search_params='{"ef": "high"}')
        )
    with pytest.raises(ConfigurationError, match=r"\.db"):
        MilvusStore(str(tmp_path / "no-suffix"))


def test_two_stores_on_one_lite_file_share_it(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    first, second = MilvusStore(path), MilvusStore(path)
    first.create_collection("c", DIM, "m")
    first.upsert("c", items(["a"], seed=16))
    first.close()
    assert second.count("c") == 1  # closing one store does not stop the other's database
    second.close()
    with pytest.raises(Unavailable, match="closed"):
        second.count("c")


def test_unreachable_server_is_unavailable_fast() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}") as error:
        MilvusStore(f"http://127.0.0.1:{port}", token="root:s3cret-token", timeout_s=3)
    assert "s3cret" not in str(error.value)
    with pytest.raises(Unavailable) as error:
        MilvusStore(f"http://root:s3cret@127.0.0.1:{port}", timeout_s=3)
    assert "s3cret" not in str(error.value)


@pytest.mark.slow  # starts its own Milvus server (~10 s) to stop it under a connected store
def test_server_stopping_under_a_store_gives_unavailable(
    tmp_path: Path, milvus_server_path: str
) -> None:
    server = MilvusServerProcess(tmp_path / "doomed", milvus_server_path)
    server.start()
    try:
        store = MilvusStore(server.uri, token="root:s3cret-token", timeout_s=5)
        store.create_collection("c", DIM, "m")
    finally:
        assert server.stop() == 0
    with pytest.raises(Unavailable) as error:
        store.search("c", unit_vectors(1, DIM, 0)[0], Target.IMAGE, 1)
    assert "s3cret" not in str(error.value)
    with pytest.raises(Unavailable):
        store.upsert("c", items(["x"], seed=0))
    store.close()


# --- Milvus Lite specifics and helpers ----------------------------------------------------


def test_writes_across_flushed_lite_segments_stay_exact(tmp_path: Path) -> None:
    # Flushing every 8 rows puts most items in segments, so replacing and deleting them
    # goes through Milvus Lite's segment paths, not just its memtable.
    with MilvusStore(str(tmp_path / "flushed.db"), lite_flush_rows=8) as store:
        store.create_collection("c", DIM, "m")
        ids = [f"f{i}" for i in range(60)]
        for start in range(0, 60, 7):
            store.upsert("c", items(ids[start : start + 7], seed=20 + start))
        assert store.count("c") == 60
        store.upsert("c", items(ids[:30], seed=40, captioned=False))
        assert store.count("c") == 60
        assert store.delete("c", [*ids[25:35], "nope"]) == 10
        assert store.count("c") == 50
        assert store.existing_ids("c", ids[20:40]) == set(ids[20:25] + ids[35:40])
        query = items(ids[:30], seed=40)[3].image_vector
        assert store.search("c", query, Target.IMAGE, 1)[0].id == "f3"  # type: ignore[arg-type]
        captioned = {hit.id for hit in store.search("c", query, Target.CAPTION, 100)}  # type: ignore[arg-type]
        assert captioned == set(ids[35:60])


def test_memtable_flusher_flushes_at_the_row_budget_and_when_idle() -> None:
    flushed: list[str] = []
    idle_flush = threading.Event()
    flusher: MemtableFlusher

    def flush_idle(collection: str) -> None:
        flushed.append(collection)
        flusher.flushed(collection)
        idle_flush.set()

    flusher = MemtableFlusher(flush_idle, every_rows=10, idle_s=0.05)
    try:
        assert flusher.written("a", 4) is False
        assert flusher.written("b", 10) is True  # the writer flushes b itself
        flusher.flushed("b")
        assert idle_flush.wait(timeout=10)
        assert flushed == ["a"]
    finally:
        flusher.close()


def test_reads_after_a_delete_are_strong_until_one_completes() -> None:
    reads = ReadConsistency()
    assert reads.level("c").level == "Session"
    reads.deleted("c")
    first = reads.level("c")
    assert first.level == "Strong"
    reads.deleted("c")  # a delete while the first Strong read is in flight
    reads.completed("c", first)
    second = reads.level("c")
    assert second.level == "Strong"
    reads.completed("c", second)
    assert reads.level("c").level == "Session"
    assert reads.level("other").level == "Session"
