"""The `VectorStore` contract, checked on `InMemoryStore`, on Milvus Lite and (marked slow) on a
real Milvus server alike.

The fast service tests run on `InMemoryStore`; these checks keep it from drifting from the
real store: every parametrized test runs the same calls with the same expected results on
all three (`test_store` keeps what is MilvusStore's own). The tests at the end are about the
in-memory store's own limits (its filter subset).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from store_fixtures import MilvusServerProcess, stored_items, unit_vectors

from clipsearch.server.errors import (
    AlreadyExists,
    InvalidFilter,
    InvalidInput,
    ModelMismatch,
    NotFound,
    Unavailable,
)
from clipsearch.server.store import MilvusStore, StoredItem, Target, VectorStore
from clipsearch.server.store.memory import InMemoryStore
from clipsearch.server.store.validation import COMPANION_SUFFIX

DIM = 16
SIZE = 60
COLOURS = ("red", "green", "blue")
BACKENDS = ("memory", "lite")


def open_store(kind: str, tmp_path_factory: pytest.TempPathFactory) -> VectorStore:
    if kind == "memory":
        return InMemoryStore()
    return MilvusStore(str(tmp_path_factory.mktemp("contract") / "milvus.db"))


@pytest.fixture(scope="module", params=[*BACKENDS, pytest.param("server", marks=pytest.mark.slow)])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VectorStore]:
    if request.param == "server":
        server: MilvusServerProcess = request.getfixturevalue("milvus_server")
        opened: VectorStore = MilvusStore(server.uri)
    else:
        opened = open_store(request.param, tmp_path_factory)
    yield opened
    opened.close()


@pytest.fixture
def name(store: VectorStore) -> Iterator[str]:
    """A fresh collection, dropped after the test."""
    collection = f"t_{uuid.uuid4().hex[:10]}"
    store.create_collection(collection, DIM, "m")
    yield collection
    with contextlib.suppress(NotFound):
        store.drop_collection(collection)


def items(ids: list[str], seed: int, captioned: bool = True) -> list[StoredItem]:
    return stored_items(ids, seed, DIM, captioned)


# --- a gallery with varied metadata, shared by the search and filter checks ---------------


def colour(i: int) -> str:
    return COLOURS[i % 3]


def plain(i: int) -> bool:
    """Items 8, 18, ... have a null colour and a string rank; 9, 19, ... no metadata."""
    return i % 10 < 8


def metadata(i: int) -> dict[str, Any]:
    if i % 10 == 9:
        return {}
    if i % 10 == 8:
        return {"colour": None, "rank": str(i)}
    parity = "even" if i % 2 == 0 else "odd"
    return {"colour": colour(i), "rank": i, "tags": [parity], "shape": {"sides": i % 5}}


@dataclass(frozen=True)
class Gallery:
    store: VectorStore
    name: str
    ids: list[str]
    images: np.ndarray
    captions: np.ndarray  # rows of uncaptioned (odd) items are zero

    def expected(
        self, query: np.ndarray, target: Target, keep: Callable[[int], bool] = lambda i: True
    ) -> list[str]:
        """Ids by descending inner product, computed with numpy."""
        vectors = self.images if target is Target.IMAGE else self.captions
        order = [int(i) for i in np.argsort(-(vectors @ query), kind="stable")]
        if target is Target.CAPTION:
            order = [i for i in order if i % 2 == 0]  # only even items have captions
        return [self.ids[i] for i in order if keep(i)]


@pytest.fixture(scope="module")
def gallery(store: VectorStore) -> Iterator[Gallery]:
    yield from fill_gallery(store)


@pytest.fixture(scope="module", params=BACKENDS)
def filter_gallery(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gallery]:
    """The gallery on the in-memory store and Milvus Lite only: the in-memory filter subset
    follows Lite's semantics (null and missing JSON values), which the 2.3 server does not
    share; `test_store` checks the server's filters."""
    store = open_store(request.param, tmp_path_factory)
    yield from fill_gallery(store)
    store.close()


def fill_gallery(store: VectorStore) -> Iterator[Gallery]:
    name = f"gallery_{uuid.uuid4().hex[:8]}"
    store.create_collection(name, DIM, "test-model")
    ids = [f"img-{i:03d}" for i in range(SIZE)]
    images = unit_vectors(SIZE, DIM, seed=10)
    captions = unit_vectors(SIZE, DIM, seed=11)
    captions[1::2] = 0.0
    store.upsert(
        name,
        [
            StoredItem(
                id=ids[i],
                uri=f"s3://bucket/{colour(i)}/{i}.jpg",
                caption=f"a {colour(i)} thing number {i}" if i % 2 == 0 else "",
                metadata=metadata(i),
                image_vector=images[i],
                caption_vector=captions[i] if i % 2 == 0 else None,
            )
            for i in range(SIZE)
        ],
    )
    yield Gallery(store, name, ids, images, captions)
    store.drop_collection(name)


# --- collections --------------------------------------------------------------------------


def test_create_list_describe_drop(store: VectorStore) -> None:
    name = f"c_{uuid.uuid4().hex[:10]}"
    assert store.create_collection(name, DIM, "model-a") is True
    assert store.create_collection(name, DIM, "model-a", exist_ok=True) is False
    with pytest.raises(AlreadyExists, match=name):
        store.create_collection(name, DIM, "model-a")
    with pytest.raises(ModelMismatch, match="model-a"):
        store.create_collection(name, DIM, "model-b", exist_ok=True)
    with pytest.raises(ModelMismatch):
        store.create_collection(name, DIM * 2, "model-a", exist_ok=True)
    listed = {info.name: info for info in store.list_collections()}
    assert (listed[name].dim, listed[name].model_id, listed[name].count) == (DIM, "model-a", 0)
    assert not [n for n in listed if n.endswith(COMPANION_SUFFIX)]
    info = store.describe(name)
    assert (info.name, info.dim, info.model_id, info.count) == (name, DIM, "model-a", 0)
    store.drop_collection(name)
    assert name not in {info.name for info in store.list_collections()}
    with pytest.raises(NotFound):
        store.describe(name)
    with pytest.raises(NotFound):
        store.drop_collection(name)
    assert store.create_collection(name, DIM, "model-b") is True  # the name is free again
    store.drop_collection(name)


@pytest.mark.parametrize(
    "bad", ["bad-name", "", "1digit", "has space", "x" * 300, "c" + COMPANION_SUFFIX]
)
def test_invalid_collection_names_dims_and_models(store: VectorStore, bad: str) -> None:
    with pytest.raises(InvalidInput):
        store.create_collection(bad, DIM, "m")
    # reading: a malformed name is bad input, a companion's name just does not exist
    with pytest.raises(NotFound if bad.endswith(COMPANION_SUFFIX) else InvalidInput):
        store.count(bad)
    with pytest.raises(InvalidInput, match="dimension"):
        store.create_collection("fine_name", 1, "m")
    with pytest.raises(InvalidInput, match="model id"):
        store.create_collection("fine_name", DIM, "")


def test_unknown_collection_is_not_found_everywhere(store: VectorStore) -> None:
    missing = "no_such_collection"
    vector = unit_vectors(1, DIM, 0)[0]
    calls: list[Callable[[], object]] = [
        lambda: store.describe(missing),
        lambda: store.drop_collection(missing),
        lambda: store.upsert(missing, items(["a"], 0)),
        lambda: store.get(missing, ["a"]),
        lambda: store.existing_ids(missing, ["a"]),
        lambda: store.delete(missing, ["a"]),
        lambda: store.count(missing),
        lambda: store.search(missing, vector, Target.IMAGE, 5),
        lambda: store.search(missing + COMPANION_SUFFIX, vector, Target.IMAGE, 5),
    ]
    for call in calls:
        with pytest.raises(NotFound, match="does not exist"):
            call()


# --- writes and reads ---------------------------------------------------------------------


def test_upsert_counts_replaces_and_keeps_the_last_of_an_id(store: VectorStore, name: str) -> None:
    ids = [f"item-{i}" for i in range(30)]
    store.upsert(name, items(ids, seed=1))
    assert store.count(name) == store.describe(name).count == 30
    store.upsert(name, items(ids[:10], seed=2))
    assert store.count(name) == 30
    got = store.get(name, ids[:10] + ids[25:], include_vectors=True)
    assert [item.id for item in got] == ids[:10] + ids[25:]
    assert [item.metadata["seed"] for item in got] == [2] * 10 + [1] * 5
    np.testing.assert_array_equal(got[3].image_vector, unit_vectors(10, DIM, 2)[3])  # type: ignore[arg-type]
    top = store.search(name, unit_vectors(10, DIM, 2)[7], Target.IMAGE, 1)
    assert top[0].id == ids[7] and top[0].score == pytest.approx(1.0, abs=1e-5)
    first, second = items(["same"], seed=3)[0], items(["same"], seed=4)[0]
    store.upsert(name, [first, second])
    assert store.count(name) == 31
    assert store.get(name, ["same"])[0].metadata["seed"] == 4


def test_get_in_request_order_with_exact_vectors(store: VectorStore, name: str) -> None:
    written = {item.id: item for item in items([f"g{i}" for i in range(6)], seed=5)}
    written["g5"] = items(["g5"], seed=6, captioned=False)[0]
    store.upsert(name, list(written.values()))
    got = store.get(name, ["g4", "missing", "g1", "g4", "g5"], include_vectors=True)
    assert [item.id for item in got] == ["g4", "g1", "g5"]
    for item in got:
        expected = written[item.id]
        assert (item.uri, item.caption, item.metadata) == (
            expected.uri,
            expected.caption,
            expected.metadata,
        )
        assert item.image_vector is not None and item.image_vector.dtype == np.float32
        np.testing.assert_array_equal(item.image_vector, expected.image_vector)  # type: ignore[arg-type]
        if expected.caption_vector is None:
            assert item.caption_vector is None
        else:
            np.testing.assert_array_equal(item.caption_vector, expected.caption_vector)  # type: ignore[arg-type]
    (bare,) = store.get(name, ["g1"])
    assert bare.image_vector is None and bare.caption_vector is None
    assert store.get(name, []) == []
    with pytest.raises(InvalidInput, match="not one string"):
        store.get(name, "g1")


def test_caption_removed_on_reupsert_leaves_caption_search(store: VectorStore, name: str) -> None:
    captioned = items(["a", "b", "c"], seed=7)
    store.upsert(name, captioned)
    query = captioned[1].caption_vector
    assert query is not None
    assert store.search(name, query, Target.CAPTION, 1)[0].id == "b"
    store.upsert(name, items(["b"], seed=7, captioned=False))
    assert {hit.id for hit in store.search(name, query, Target.CAPTION, 10)} == {"a", "c"}
    (b,) = store.get(name, ["b"], include_vectors=True)
    assert b.caption == "" and b.caption_vector is None and b.image_vector is not None
    assert store.count(name) == 3


def test_existing_ids_and_exact_delete_counts(store: VectorStore, name: str) -> None:
    written = items(["d1", "d2", "d3", "d4", 'it\'s "odd"\\'], seed=8)
    store.upsert(name, written)
    assert store.existing_ids(name, ["d1", "x", "d4", "d1"]) == {"d1", "d4"}
    assert store.existing_ids(name, []) == set()
    assert store.delete(name, ["d1", "d1", "nope", "d3", 'it\'s "odd"\\']) == 3
    assert store.delete(name, ["d1", "nope"]) == 0
    assert store.delete(name, []) == 0
    assert store.count(name) == 2
    assert store.existing_ids(name, [item.id for item in written]) == {"d2", "d4"}
    hits = store.search(name, written[0].caption_vector, Target.CAPTION, 10)  # type: ignore[arg-type]
    assert {hit.id for hit in hits} == {"d2", "d4"}


def test_bad_items_are_refused_before_anything_is_written(store: VectorStore, name: str) -> None:
    good = items(["ok"], seed=9)[0]
    vector = unit_vectors(1, DIM, 9)[0]
    bad_items = {
        "no image vector": StoredItem("x", image_vector=None),
        "dimension 7, expected 16": StoredItem("x", image_vector=vector[:7]),
        "caption vector has dimension": StoredItem(
            "x", image_vector=vector, caption_vector=np.ones(DIM + 1, np.float32)
        ),
        "zero vector": StoredItem("x", image_vector=np.zeros(DIM, np.float32)),
        "NaN": StoredItem("x", image_vector=np.full(DIM, np.nan, np.float32)),
        "control character": StoredItem("a\x00b", image_vector=vector),
        "non-empty string": StoredItem("", image_vector=vector),
        "not valid JSON": StoredItem("x", metadata={"when": object()}, image_vector=vector),
        "bytes": StoredItem("x", uri="u" * 5000, image_vector=vector),
    }
    for message, bad in bad_items.items():
        with pytest.raises(InvalidInput, match=message):
            store.upsert(name, [good, bad])
    assert store.count(name) == 0


def test_unnormalized_vectors_are_stored_normalized(store: VectorStore, name: str) -> None:
    vector = unit_vectors(1, DIM, 12)[0]
    store.upsert(name, [StoredItem("big", image_vector=vector * 3.0)])
    (item,) = store.get(name, ["big"], include_vectors=True)
    np.testing.assert_allclose(item.image_vector, vector, atol=1e-6)  # type: ignore[arg-type]
    assert store.search(name, vector * 0.5, Target.IMAGE, 1)[0].score == pytest.approx(1.0, 1e-5)


# --- search -------------------------------------------------------------------------------


def test_search_ranks_like_numpy_with_its_scores(gallery: Gallery) -> None:
    query = unit_vectors(1, DIM, seed=99)[0]
    hits = gallery.store.search(gallery.name, query, Target.IMAGE, 10)
    assert [hit.id for hit in hits] == gallery.expected(query, Target.IMAGE)[:10]
    expected = [float(gallery.images[gallery.ids.index(hit.id)] @ query) for hit in hits]
    np.testing.assert_allclose([hit.score for hit in hits], expected, atol=1e-5)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    first = gallery.ids.index(hits[0].id)
    assert hits[0].uri == f"s3://bucket/{colour(first)}/{first}.jpg"
    assert hits[0].metadata == metadata(first)
    own = gallery.store.search(gallery.name, gallery.images[33], Target.IMAGE, 1)[0]
    assert own.id == "img-033" and own.score == pytest.approx(1.0, abs=1e-5)


def test_caption_search_sees_only_captioned_items(gallery: Gallery) -> None:
    query = gallery.captions[42]
    hits = gallery.store.search(gallery.name, query, Target.CAPTION, 20)
    assert [hit.id for hit in hits] == gallery.expected(query, Target.CAPTION)[:20]
    assert hits[0].id == "img-042" and hits[0].caption == "a red thing number 42"


def test_offset_pages_are_disjoint_and_ordered(gallery: Gallery) -> None:
    query = unit_vectors(1, DIM, seed=98)[0]
    pages = [
        gallery.store.search(gallery.name, query, Target.IMAGE, 7, offset=offset)
        for offset in (0, 7, 14)
    ]
    assert [hit.id for page in pages for hit in page] == gallery.expected(query, Target.IMAGE)[:21]
    scores = [hit.score for page in pages for hit in page]
    assert scores == sorted(scores, reverse=True)
    last = gallery.store.search(gallery.name, query, Target.IMAGE, 50, offset=SIZE - 5)
    assert [hit.id for hit in last] == gallery.expected(query, Target.IMAGE)[-5:]


def test_exclude_ids_and_output_fields(gallery: Gallery) -> None:
    query = gallery.images[10]
    excluded = ["img-010", "img-000", "not-there"]
    hits = gallery.store.search(gallery.name, query, Target.IMAGE, 5, exclude_ids=excluded)
    expected = [i for i in gallery.expected(query, Target.IMAGE) if i not in excluded][:5]
    assert [hit.id for hit in hits] == expected
    (uri_only,) = gallery.store.search(
        gallery.name, gallery.images[0], Target.IMAGE, 1, output_fields=["uri"]
    )
    assert (uri_only.uri, uri_only.caption, uri_only.metadata) == ("s3://bucket/red/0.jpg", "", {})
    with pytest.raises(InvalidInput, match="unknown output field 'vector'"):
        gallery.store.search(gallery.name, query, Target.IMAGE, 1, output_fields=["vector"])


def test_range_search_keeps_scores_between_radius_and_range_filter(gallery: Gallery) -> None:
    query = gallery.images[5]
    scores = {i: float(gallery.images[n] @ query) for n, i in enumerate(gallery.ids)}
    ranked = gallery.expected(query, Target.IMAGE)
    params = {"radius": 0.1, "range_filter": 0.9}
    hits = gallery.store.search(gallery.name, query, Target.IMAGE, 50, params=params)
    expected = [i for i in ranked if 0.1 < scores[i] <= 0.9]
    assert 0 < len(expected) < SIZE - 1 and "img-005" not in expected
    assert [hit.id for hit in hits] == expected[:50]


@pytest.mark.parametrize(
    ("top_k", "offset", "params", "message"),
    [
        (0, 0, None, "top_k"),
        (5, -1, None, "offset"),
        (10_000, 10_000, None, "at most 16384"),
        (5, 0, {"ef": -3}, "positive integer"),
        (5, 0, {"nprobe": float("nan")}, "finite"),
        (5, 0, {"ef": 2e8}, "between 1 and 16384"),
        (5, 0, {"search_k": 10}, "unknown search param"),
    ],
)
def test_bad_search_windows_and_params_are_invalid_input(
    gallery: Gallery, top_k: int, offset: int, params: dict[str, float] | None, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        gallery.store.search(
            gallery.name, gallery.images[0], Target.IMAGE, top_k, offset=offset, params=params
        )


def test_bad_query_vectors_are_invalid_input(gallery: Gallery) -> None:
    bad = {
        f"dimension {DIM - 1}, expected {DIM}": np.ones(DIM - 1, np.float32),
        "one vector": np.ones((2, DIM), np.float32),
        "zero vector": np.zeros(DIM, np.float32),
        "NaN": np.full(DIM, np.nan, np.float32),
    }
    for message, vector in bad.items():
        with pytest.raises(InvalidInput, match=message):
            gallery.store.search(gallery.name, vector, Target.IMAGE, 3)


# --- filters: the in-memory subset means what it means on Milvus --------------------------


FILTERS: dict[str, Callable[[int], bool]] = {
    'metadata["colour"] == "red"': lambda i: plain(i) and colour(i) == "red",
    # a null or missing value is unknown: neither equal nor unequal, and `not` keeps it so
    'metadata["colour"] != "red"': lambda i: plain(i) and colour(i) != "red",
    'not (metadata["colour"] == "red")': lambda i: plain(i) and colour(i) != "red",
    # a value of another type than the literal is unequal, never less or greater
    'metadata["rank"] < 20': lambda i: plain(i) and i < 20,
    'metadata["rank"] != 12': lambda i: i % 10 != 9 and i != 12,
    'metadata["rank"] == "18"': lambda i: i == 18,
    'metadata["rank"] == true': lambda i: i == 1,
    'metadata["shape"]["sides"] >= 3': lambda i: plain(i) and i % 5 >= 3,
    'metadata["tags"][0] == "even"': lambda i: plain(i) and i % 2 == 0,
    'metadata["colour"] like "b%"': lambda i: plain(i) and colour(i) == "blue",
    'uri like "s3://bucket/blue/%"': lambda i: colour(i) == "blue",
    'caption like "a gr_en%"': lambda i: colour(i) == "green" and i % 2 == 0,
    "caption == ''": lambda i: i % 2 == 1,
    'id in ["img-005", "img-006", "img-050", "nope"]': lambda i: i in (5, 6, 50),
    'id not in ["img-005"]': lambda i: i != 5,
    'id >= "img-050"': lambda i: i >= 50,
    'metadata["colour"] == "red" or metadata["rank"] < 5': lambda i: (
        plain(i) and (colour(i) == "red" or i < 5)
    ),
    'metadata["missing"] == 1 or id == "img-009"': lambda i: i == 9,
    'not (metadata["rank"] == 3 or metadata["missing"] == 1)': lambda i: False,
    'NOT (id >= "img-010") && metadata["colour"] LIKE "b%"': lambda i: (
        i < 10 and plain(i) and colour(i) == "blue"
    ),
    "true": lambda i: True,
}


@pytest.mark.parametrize("expression", list(FILTERS))
def test_filters_select_the_same_items(filter_gallery: Gallery, expression: str) -> None:
    gallery, keep = filter_gallery, FILTERS[expression]
    assert gallery.store.count(gallery.name, expression) == sum(map(keep, range(SIZE)))
    query = unit_vectors(1, DIM, seed=97)[0]
    hits = gallery.store.search(gallery.name, query, Target.IMAGE, 10, filter=expression)
    assert [hit.id for hit in hits] == gallery.expected(query, Target.IMAGE, keep)[:10]
    captions = gallery.store.search(gallery.name, query, Target.CAPTION, 5, filter=expression)
    assert [hit.id for hit in captions] == gallery.expected(query, Target.CAPTION, keep)[:5]


@pytest.mark.parametrize(
    "expression",
    [
        'id in ["a"',
        "no_such_field == 1",
        "uri == 3",
        "(((",
        'metadata["rank"] >',
        "caption like 3",
        'id in ["a", 1]',
        'metadata["rank"] in [1, 2]',
        'caption like "a\\%b"',
        'id == "a" and',
        "metadata == 1",
    ],
)
def test_bad_filter_is_invalid_filter_naming_it(filter_gallery: Gallery, expression: str) -> None:
    gallery = filter_gallery
    with pytest.raises(InvalidFilter) as error:
        gallery.store.search(gallery.name, gallery.images[0], Target.IMAGE, 3, filter=expression)
    assert repr(expression) in str(error.value)
    with pytest.raises(InvalidFilter):
        gallery.store.count(gallery.name, expression)


def test_a_closed_store_is_unavailable(tmp_path_factory: pytest.TempPathFactory) -> None:
    for kind in BACKENDS:
        store = open_store(kind, tmp_path_factory)
        store.create_collection("c", DIM, "m")
        store.close()
        with pytest.raises(Unavailable, match="closed"):
            store.count("c")


# --- the in-memory store's own limits -----------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        'json_contains(metadata["tags"], "even")',
        'metadata["rank"] + 1 == 2',
        '3 < metadata["rank"]',
    ],
)
def test_memory_store_refuses_milvus_expressions_outside_its_subset(expression: str) -> None:
    store = InMemoryStore()
    store.create_collection("c", DIM, "m")
    with pytest.raises(InvalidFilter, match="subset of Milvus filters"):
        store.count("c", expression)


def test_memory_store_keeps_its_own_copies() -> None:
    store = InMemoryStore()
    store.create_collection("c", DIM, "m")
    (item,) = items(["a"], seed=13)
    store.upsert("c", [item])
    assert item.image_vector is not None
    item.image_vector[:] = 0.0
    item.metadata["n"] = 99
    (got,) = store.get("c", ["a"], include_vectors=True)
    np.testing.assert_array_equal(got.image_vector, unit_vectors(1, DIM, 13)[0])  # type: ignore[arg-type]
    assert got.metadata == {"n": 0, "seed": 13}
