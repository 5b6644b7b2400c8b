"""Search means something: the committed demo model behind a real server on port 0, a
generated gallery streamed in through the client, and queries in all four directions whose
hits must show the asked colour and shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_fixtures import ThreadedServer, quick_settings

from clipsearch.client import Client, InvalidArgument, NotFound, SearchResult
from clipsearch.export.demo_data import GalleryItem, generate_gallery

COLLECTION = "gallery"
N = 160


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, GalleryItem]]:
    root = tmp_path_factory.mktemp("gallery")
    items = generate_gallery(root, N, seed=21)
    return root, {item.id: item for item in items}


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, gallery: tuple[Path, dict[str, GalleryItem]]
) -> Iterator[Client]:
    db = tmp_path_factory.mktemp("demo-search") / "store.db"
    with (
        ThreadedServer(quick_settings(db, index_type="HNSW")) as server,
        Client(server.address) as client,
    ):
        root, _ = gallery
        summary = client.ingest_path(
            root / "manifest.csv", caption_field="caption_en", collection=COLLECTION, progress=False
        )
        assert (summary.ok, summary.failed, summary.skipped) == (N, 0, 0)
        yield client


def objects(item: GalleryItem) -> set[tuple[str, str]]:
    found = {(item.colour, item.shape)}
    if item.shape2:
        found.add((item.colour2, item.shape2))
    return found


def shows(items: dict[str, GalleryItem], hit_id: str, colour: str, shape: str) -> bool:
    return (colour, shape) in objects(items[hit_id])


def single(items: dict[str, GalleryItem], colour: str, shape: str) -> list[GalleryItem]:
    return [
        i for i in items.values() if i.n_objects == 1 and (i.colour, i.shape) == (colour, shape)
    ]


def test_ingest_gives_exact_counts_and_reingest_does_not_duplicate(
    client: Client, gallery: tuple[Path, dict[str, GalleryItem]]
) -> None:
    root, items = gallery
    assert client.count(collection=COLLECTION) == N
    again = client.ingest_path(
        root / "manifest.csv", caption_field="caption_en", collection=COLLECTION, progress=False
    )
    assert again.ok == N
    assert client.count(collection=COLLECTION) == N
    dark = sum(1 for i in items.values() if i.background == "dark")
    assert client.count('metadata["background"] == "dark"', collection=COLLECTION) == dark


@pytest.mark.parametrize(
    ("query", "colour", "shape"),
    [
        ("a red circle", "red", "circle"),
        ("红色的圆形", "red", "circle"),
        ("blue square", "blue", "square"),
        ("黄色的五角星", "yellow", "star"),
        ("a green triangle", "green", "triangle"),
    ],
)
def test_text_to_image_puts_the_asked_object_first(
    client: Client,
    gallery: tuple[Path, dict[str, GalleryItem]],
    query: str,
    colour: str,
    shape: str,
) -> None:
    _, items = gallery
    assert single(items, colour, shape), "the gallery must hold the asked object"
    result = client.search(query, collection=COLLECTION, top_k=5)
    assert shows(items, result.hits[0].id, colour, shape), describe(result, items)
    right = sum(shows(items, h.id, colour, shape) for h in result.hits)
    assert right >= 4, describe(result, items)


def test_image_to_image_and_image_to_caption_and_more_like_this(
    client: Client, gallery: tuple[Path, dict[str, GalleryItem]]
) -> None:
    root, items = gallery
    query = single(items, "purple", "star")[0]
    image = (root / query.path).read_bytes()
    by_image = client.search(image=image, collection=COLLECTION, top_k=5)
    assert by_image.hits[0].id == query.id  # the image itself
    assert all(shows(items, h.id, "purple", "star") for h in by_image.hits[:3]), describe(
        by_image, items
    )
    by_caption = client.search(image=image, target="caption", collection=COLLECTION, top_k=3)
    assert "purple star" in by_caption.hits[0].caption, describe(by_caption, items)
    like = client.search(like=query.id, collection=COLLECTION, top_k=5)
    assert query.id not in [h.id for h in like.hits]
    assert sum(shows(items, h.id, "purple", "star") for h in like.hits) >= 3, describe(like, items)


def test_text_to_caption_and_fused_search(
    client: Client, gallery: tuple[Path, dict[str, GalleryItem]]
) -> None:
    _, items = gallery
    captions = client.search("an orange square", target="caption", collection=COLLECTION, top_k=3)
    assert "orange square" in captions.hits[0].caption, describe(captions, items)
    fused = client.search("an orange square", target="both", collection=COLLECTION, top_k=5)
    assert shows(items, fused.hits[0].id, "orange", "square"), describe(fused, items)
    assert [h.score for h in fused.hits] == sorted((h.score for h in fused.hits), reverse=True)


def test_pages_are_disjoint_and_ordered(client: Client) -> None:
    whole = client.search("a circle", collection=COLLECTION, top_k=30)
    pages = [
        client.search("a circle", collection=COLLECTION, top_k=10, offset=o) for o in (0, 10, 20)
    ]
    ids = [h.id for page in pages for h in page.hits]
    assert len(set(ids)) == 30
    assert ids == [h.id for h in whole.hits]
    scores = [h.score for page in pages for h in page.hits]
    assert scores == sorted(scores, reverse=True)


def test_filters_restrict_results(
    client: Client, gallery: tuple[Path, dict[str, GalleryItem]]
) -> None:
    _, items = gallery
    result = client.search(
        "a star",
        filter='metadata["background"] == "dark" and metadata["n_objects"] == 1',
        collection=COLLECTION,
        top_k=20,
    )
    assert result.hits
    for hit in result.hits:
        assert items[hit.id].background == "dark" and items[hit.id].n_objects == 1
    assert sum(items[h.id].shape == "star" for h in result.hits[:5]) >= 4, describe(result, items)


def test_get_delete_and_bad_input(
    client: Client, gallery: tuple[Path, dict[str, GalleryItem]]
) -> None:
    root, items = gallery
    victim = next(iter(items.values()))
    (got,) = client.get([victim.id], collection=COLLECTION)
    assert got.caption == victim.caption_en and got.metadata["shape"] == victim.shape
    assert Path(got.uri) == (root / victim.path).resolve()
    assert client.delete([victim.id], collection=COLLECTION) == 1
    assert client.get([victim.id], collection=COLLECTION) == []
    assert client.count(collection=COLLECTION) == N - 1
    hits = client.search(image=(root / victim.path).read_bytes(), collection=COLLECTION, top_k=20)
    assert victim.id not in [h.id for h in hits.hits]
    with pytest.raises(InvalidArgument, match="empty"):
        client.search("  ", collection=COLLECTION)
    with pytest.raises(InvalidArgument, match="filter"):
        client.search("a star", filter="background === dark", collection=COLLECTION)
    with pytest.raises(NotFound):
        client.search("a star", collection="no_such_collection")
    assert client.search("a star", collection=COLLECTION, top_k=1).hits  # still serving


def describe(result: SearchResult, items: dict[str, GalleryItem]) -> str:
    return "; ".join(
        f"{h.id} {h.score:.3f} {sorted(objects(items[h.id]))}" for h in result.hits if h.id in items
    )
