"""Service, search and ingest logic on fakes: a real gRPC server on port 0, a FakeBackend
behind the bundle's real tokenizer and image preprocessing, and an InMemoryStore.

Every vector is a known function of its input, so these tests assert exact results: counts,
rankings computed with numpy from the same fake vectors, pages, fusion, errors per item. They
run in seconds; test_service.py and the client tests cover the same wire on ONNX Runtime and
Milvus Lite.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime
import pytest
from image_fixtures import encode, pattern
from server_fixtures import ThreadedServer, acks_of, quick_settings, served_model

from clipsearch.server.app import fake_components
from clipsearch.server.bundle import load_bundle
from clipsearch.server.fake import FakeBackend
from clipsearch.server.images import ImagePreprocessor
from clipsearch.server.search import RRF_K
from clipsearch.server.settings import Settings
from clipsearch.server.store import milvus
from clipsearch.server.store.memory import InMemoryStore
from clipsearch.server.text import TextTokenizer
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

BUNDLE = load_bundle(served_model())
N = 24
IDS = [f"item-{i:02d}" for i in range(N)]


def jpeg(seed: int) -> bytes:
    return encode(pattern((80 + seed, 64), seed=seed), "JPEG", quality=90)


def caption_of(i: int) -> str:
    """Two items in three have a caption."""
    return f"a photo of pattern number {i}" if i % 3 else ""


class FakeModel:
    """The vectors the served fake gives, computed here from the same parts."""

    def __init__(self) -> None:
        self.backend = FakeBackend.for_manifest(BUNDLE.manifest)
        self.tokenizer = TextTokenizer.from_bundle(BUNDLE)
        self.preprocessor = ImagePreprocessor.from_bundle(BUNDLE)

    def text(self, text: str) -> np.ndarray:
        return self.backend.run_text(self.tokenizer.pad(self.tokenizer.tokenize([text])))[0]

    def image(self, data: bytes) -> np.ndarray:
        return self.backend.run_vision(self.preprocessor(data)[None])[0]


MODEL = FakeModel()
IMAGES = np.stack([MODEL.image(jpeg(i)) for i in range(N)])
CAPTIONED = [i for i in range(N) if caption_of(i)]
CAPTIONS = {i: MODEL.text(caption_of(i)) for i in CAPTIONED}


def ranking(
    query: np.ndarray, target: str = "image", keep: Callable[[int], bool] = lambda n: True
) -> list[str]:
    """Ids of the gallery (its captioned items) by descending inner product with `query`."""
    rows = list(range(N)) if target == "image" else CAPTIONED
    scores = np.stack([IMAGES[i] if target == "image" else CAPTIONS[i] for i in rows]) @ query
    order = np.argsort(-scores, kind="stable")
    return [IDS[rows[n]] for n in order if keep(rows[n])]


def fused(query: np.ndarray, window: int) -> list[str]:
    """Reciprocal rank fusion of the top `window` of both rankings; ties by id."""
    scores: dict[str, float] = {}
    for ids in (ranking(query)[:window], ranking(query, "caption")[:window]):
        for rank, item_id in enumerate(ids, start=1):
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores, key=lambda item_id: (-scores[item_id], item_id))


def floats(vector: pb.Vector) -> np.ndarray:
    return np.frombuffer(vector.data, dtype="<f4")


def fake_settings(tmp: Path, **overrides: Any) -> Settings:
    # The Milvus Lite path is never opened: the store is an InMemoryStore.
    return quick_settings(tmp / "unused.db", served_model(), **overrides)


def options(collection: str, create: bool = True, skip: bool = False) -> pb.IngestRequest:
    return pb.IngestRequest(
        options=pb.IngestOptions(
            collection=collection, create_collection=create, skip_existing=skip
        )
    )


def item(seq: int, **fields: Any) -> pb.IngestRequest:
    fields.setdefault("image", jpeg(seq))
    return pb.IngestRequest(items=[pb.IngestItem(seq=seq, **fields)])


def gallery_requests(collection: str) -> list[pb.IngestRequest]:
    return [options(collection)] + [
        item(i, id=IDS[i], caption=caption_of(i), uri=f"file:///{i}.jpg",
             metadata_json=json.dumps({"n": i, "even": i % 2 == 0}))
        for i in range(N)
    ]  # fmt: skip


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    settings = fake_settings(tmp_path_factory.mktemp("fake-service"))
    with ThreadedServer(settings, fake_components()) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ThreadedServer) -> Iterator[pb_grpc.ClipSearchStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ClipSearchStub(channel)


@pytest.fixture(scope="module")
def gallery(stub: pb_grpc.ClipSearchStub) -> str:
    acks = acks_of(stub.Ingest(iter(gallery_requests("gallery")), timeout=30))
    assert sorted(a.seq for a in acks if a.status == pb.INGEST_STATUS_OK) == list(range(N))
    return "gallery"


def search(stub: pb_grpc.ClipSearchStub, **fields: Any) -> list[str]:
    fields.setdefault("collection", "gallery")
    return [hit.id for hit in stub.Search(pb.SearchRequest(**fields), timeout=10).hits]


# --- model and encoding --------------------------------------------------------------------


def test_the_fakes_need_neither_onnx_runtime_nor_milvus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fake service must not start this")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    monkeypatch.setattr(milvus, "MilvusClient", refuse)
    with (
        ThreadedServer(fake_settings(tmp_path), fake_components()) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.ClipSearchStub(channel)
        (ack,) = acks_of(stub.Ingest(iter([options("c"), item(1, id="one")]), timeout=10))
        assert ack.status == pb.INGEST_STATUS_OK
        assert search(stub, collection="c", text="x") == ["one"]


def test_info_says_what_runs(stub: pb_grpc.ClipSearchStub) -> None:
    info = stub.Info(pb.InfoRequest(), timeout=5)
    manifest = BUNDLE.manifest
    assert (info.model_id, info.dim, info.model_name) == (
        manifest.model_id,
        manifest.dim,
        manifest.name,
    )
    assert info.text.precision == info.vision.precision == "fake"
    assert list(info.text.providers) == list(info.vision.providers) == ["FakeBackend"]
    assert info.store == "memory"


def test_encode_gives_the_backends_vectors_and_batch_equals_single(
    stub: pb_grpc.ClipSearchStub,
) -> None:
    texts = ["a red circle", "红色的圆形", "a long text " * 40]
    inputs = [
        pb.EncodeInput(text=texts[0]),
        pb.EncodeInput(image=jpeg(1)),
        pb.EncodeInput(text=texts[1]),
        pb.EncodeInput(image=jpeg(2)),
        pb.EncodeInput(text=texts[2]),
    ]
    batch = stub.Encode(pb.EncodeRequest(inputs=inputs), timeout=10).embeddings
    expected = [
        MODEL.text(texts[0]),
        MODEL.image(jpeg(1)),
        MODEL.text(texts[1]),
        MODEL.image(jpeg(2)),
        MODEL.text(texts[2]),
    ]
    for embedding, vector in zip(batch, expected, strict=True):
        np.testing.assert_array_equal(floats(embedding.vector), vector)
    assert [e.truncated for e in batch] == [False, False, False, False, True]
    for single_input, from_batch in zip(inputs, batch, strict=True):
        (single,) = stub.Encode(pb.EncodeRequest(inputs=[single_input]), timeout=10).embeddings
        assert single.vector.data == from_batch.vector.data


# --- ingest ---------------------------------------------------------------------------------


def test_ingest_writes_exactly_the_items_with_their_vectors(
    stub: pb_grpc.ClipSearchStub, gallery: str
) -> None:
    assert stub.Count(pb.CountRequest(collection=gallery), timeout=5).count == N
    even = stub.Count(pb.CountRequest(collection=gallery, filter='metadata["even"] == true'))
    assert even.count == N // 2
    got = stub.Get(pb.GetRequest(collection=gallery, ids=IDS, include_vectors=True)).items
    assert [g.id for g in got] == IDS
    for i, stored in enumerate(got):
        np.testing.assert_array_equal(floats(stored.image_vector), IMAGES[i])
        if i in CAPTIONS:
            np.testing.assert_array_equal(floats(stored.caption_vector), CAPTIONS[i])
        else:
            assert not stored.caption_vector.data
        assert (stored.caption, stored.uri) == (caption_of(i), f"file:///{i}.jpg")
        assert json.loads(stored.metadata_json) == {"n": i, "even": i % 2 == 0}


def test_bad_items_fail_alone_with_their_reason(stub: pb_grpc.ClipSearchStub) -> None:
    requests = [
        options("mixed"),
        item(1, id="good-1", caption="a pattern", metadata_json='{"k": 1}'),
        item(2, id="no-image", image=b""),
        item(3, id="bad-json", metadata_json="{not json"),
        item(4, id="not-object", metadata_json="[1, 2]"),
        item(5, id="corrupt", image=b"\xff\xd8\xff garbage"),
        item(6, id="x" * 5000),
        item(7, id="good-2"),
        item(8),  # no id: the content hash
    ]
    acks = {a.seq: a for a in acks_of(stub.Ingest(iter(requests), timeout=30))}
    assert sorted(acks) == list(range(1, 9))
    assert {s for s, a in acks.items() if a.status == pb.INGEST_STATUS_OK} == {1, 7, 8}
    for seq in (2, 3, 4, 5, 6):
        assert acks[seq].status == pb.INGEST_STATUS_FAILED and acks[seq].error
        assert acks[seq].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "JSON" in acks[3].error and "object" in acks[4].error
    assert stub.Count(pb.CountRequest(collection="mixed"), timeout=5).count == 3
    ids = {g.id for g in stub.Get(pb.GetRequest(collection="mixed", ids=[acks[8].id])).items}
    assert ids == {acks[8].id} and len(acks[8].id) == 32


def test_reingest_replaces_and_skip_existing_skips(stub: pb_grpc.ClipSearchStub) -> None:
    first = [options("again")] + [item(i, id=f"x{i}") for i in range(4)]
    assert {a.status for a in acks_of(stub.Ingest(iter(first), timeout=30))} == {
        pb.INGEST_STATUS_OK
    }
    replaced = [options("again"), item(40, id="x0", caption="now with a caption")]
    assert [a.status for a in acks_of(stub.Ingest(iter(replaced), timeout=30))] == [
        pb.INGEST_STATUS_OK
    ]
    (x0,) = stub.Get(pb.GetRequest(collection="again", ids=["x0"], include_vectors=True)).items
    np.testing.assert_array_equal(floats(x0.image_vector), MODEL.image(jpeg(40)))
    np.testing.assert_array_equal(floats(x0.caption_vector), MODEL.text("now with a caption"))
    skipping = [options("again", skip=True)] + [item(i, id=f"x{i}") for i in range(3, 6)]
    statuses = {a.id: a.status for a in acks_of(stub.Ingest(iter(skipping), timeout=30))}
    assert statuses == {
        "x3": pb.INGEST_STATUS_SKIPPED,
        "x4": pb.INGEST_STATUS_OK,
        "x5": pb.INGEST_STATUS_OK,
    }
    assert stub.Count(pb.CountRequest(collection="again"), timeout=5).count == 6


def test_a_failed_inference_batch_fails_only_its_items(tmp_path: Path) -> None:
    poison = MODEL.preprocessor(jpeg(3))

    def poisoned(batch: np.ndarray) -> bool:
        return any(np.array_equal(row, poison) for row in batch)

    settings = fake_settings(tmp_path, max_batch_size=1)
    with (
        ThreadedServer(settings, fake_components(fail_when=poisoned)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.ClipSearchStub(channel)
        requests = [options("c")] + [item(i, id=f"i{i}") for i in range(6)]
        acks = {a.id: a for a in acks_of(stub.Ingest(iter(requests), timeout=30))}
        assert {i for i, a in acks.items() if a.status == pb.INGEST_STATUS_OK} == {
            "i0",
            "i1",
            "i2",
            "i4",
            "i5",
        }
        assert acks["i3"].status == pb.INGEST_STATUS_FAILED
        assert acks["i3"].error_code == grpc.StatusCode.INTERNAL.value[0]
        assert stub.Count(pb.CountRequest(collection="c"), timeout=5).count == 5
        code, _ = code_of(
            lambda: stub.Encode(pb.EncodeRequest(inputs=[pb.EncodeInput(image=jpeg(3))]))
        )
        assert code == grpc.StatusCode.INTERNAL
        assert (
            len(stub.Encode(pb.EncodeRequest(inputs=[pb.EncodeInput(image=jpeg(4))])).embeddings)
            == 1
        )


# --- search ---------------------------------------------------------------------------------


def test_text_search_ranks_by_the_fake_vectors(stub: pb_grpc.ClipSearchStub, gallery: str) -> None:
    query = MODEL.text("a striped pattern")
    response = stub.Search(pb.SearchRequest(collection=gallery, text="a striped pattern", top_k=N))
    assert [h.id for h in response.hits] == ranking(query)
    np.testing.assert_allclose(
        [h.score for h in response.hits], sorted(IMAGES @ query, reverse=True), atol=1e-6
    )
    first = int(response.hits[0].id[5:])
    assert response.hits[0].uri == f"file:///{first}.jpg"
    assert response.hits[0].caption == caption_of(first)


def test_image_and_vector_queries_find_the_item_itself_first(
    stub: pb_grpc.ClipSearchStub, gallery: str
) -> None:
    by_image = stub.Search(pb.SearchRequest(collection=gallery, image=jpeg(5), top_k=5)).hits
    assert [h.id for h in by_image] == ranking(IMAGES[5])[:5]
    assert by_image[0].id == IDS[5] and by_image[0].score == pytest.approx(1.0, abs=1e-6)
    vector = pb.Vector(data=IMAGES[7].astype("<f4").tobytes())
    assert search(stub, vector=vector, top_k=5) == ranking(IMAGES[7])[:5]


def test_concurrent_queries_get_the_single_results(
    stub: pb_grpc.ClipSearchStub, gallery: str
) -> None:
    texts = [f"query number {i}" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda t: search(stub, text=t, top_k=5), texts))
    assert results == [ranking(MODEL.text(t))[:5] for t in texts]


def test_pages_concatenate_to_the_full_ranking(stub: pb_grpc.ClipSearchStub, gallery: str) -> None:
    text = "a pattern"
    query = MODEL.text(text)
    pages = [search(stub, text=text, top_k=5, offset=o) for o in range(0, N, 5)]
    assert [len(p) for p in pages] == [5, 5, 5, 5, 4]
    assert [i for page in pages for i in page] == ranking(query)
    for offset in (0, 4, 8):
        page = search(stub, text=text, top_k=4, offset=offset, target=pb.TARGET_BOTH)
        assert page == fused(query, offset + 4)[offset : offset + 4]


def test_caption_target_sees_only_captioned_items(
    stub: pb_grpc.ClipSearchStub, gallery: str
) -> None:
    query = MODEL.text(caption_of(4))
    hits = search(stub, text=caption_of(4), target=pb.TARGET_CAPTION, top_k=N)
    assert hits == ranking(query, "caption") and hits[0] == IDS[4]
    assert len(hits) == len(CAPTIONED)


def test_more_like_this_excludes_the_item_itself(
    stub: pb_grpc.ClipSearchStub, gallery: str
) -> None:
    hits = search(stub, like_id=IDS[3], top_k=N)
    assert hits == [i for i in ranking(IMAGES[3]) if i != IDS[3]]
    red = search(stub, like_id=IDS[3], top_k=N, filter='metadata["n"] < 10')
    assert red == [i for i in ranking(IMAGES[3], keep=lambda n: n < 10) if i != IDS[3]]
    code, message = code_of(lambda: search(stub, like_id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in message


def test_filters_and_output_fields(stub: pb_grpc.ClipSearchStub, gallery: str) -> None:
    query = MODEL.text("x")
    expression = 'metadata["n"] >= 6 and not (id in ["item-07", "item-08"])'
    keep: Callable[[int], bool] = lambda n: n >= 6 and n not in (7, 8)  # noqa: E731
    assert search(stub, text="x", top_k=N, filter=expression) == ranking(query, keep=keep)
    assert stub.Count(pb.CountRequest(collection=gallery, filter=expression)).count == N - 8
    response = stub.Search(
        pb.SearchRequest(collection=gallery, text="x", top_k=3, output_fields=["uri"])
    )
    assert all(h.uri and not h.caption and not h.metadata_json for h in response.hits)
    for bad in ('metadata["n"] >', 'json_contains(metadata["n"], 1)', "uri == 3"):
        code, message = code_of(lambda bad=bad: search(stub, text="x", filter=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid filter" in message


# --- items and collections ------------------------------------------------------------------


def test_get_delete_count(stub: pb_grpc.ClipSearchStub) -> None:
    acks_of(stub.Ingest(iter([options("items")] + [item(i, id=f"d{i}") for i in range(5)])))
    got = stub.Get(pb.GetRequest(collection="items", ids=["d3", "nope", "d0", "d3"]))
    assert [g.id for g in got.items] == ["d3", "d0"] and list(got.missing_ids) == ["nope"]
    assert not got.items[0].image_vector.data  # vectors only when asked for
    deleted = stub.Delete(pb.DeleteRequest(collection="items", ids=["d1", "d3", "d3", "never"]))
    assert deleted.deleted == 2
    assert stub.Count(pb.CountRequest(collection="items")).count == 3
    assert sorted(search(stub, collection="items", text="x", top_k=10)) == ["d0", "d2", "d4"]
    assert stub.Delete(pb.DeleteRequest(collection="items", ids=["d1"])).deleted == 0
    code, _ = code_of(lambda: stub.Get(pb.GetRequest(collection="items")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_collections_and_the_model_check(
    server: ThreadedServer, stub: pb_grpc.ClipSearchStub
) -> None:
    created = stub.CreateCollection(pb.CreateCollectionRequest(name="fresh"))
    assert created.created
    code, _ = code_of(lambda: stub.CreateCollection(pb.CreateCollectionRequest(name="fresh")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    again = stub.CreateCollection(pb.CreateCollectionRequest(name="fresh", exist_ok=True))
    assert not again.created
    listed = {c.name: c for c in stub.ListCollections(pb.ListCollectionsRequest()).collections}
    assert (listed["fresh"].count, listed["fresh"].model_id) == (0, BUNDLE.manifest.model_id)
    stub.DropCollection(pb.DropCollectionRequest(name="fresh"))
    code, _ = code_of(lambda: stub.Count(pb.CountRequest(collection="fresh")))
    assert code == grpc.StatusCode.NOT_FOUND
    assert server.server is not None and server.server.service.runtime is not None
    store = server.server.service.runtime.store.store
    assert isinstance(store, InMemoryStore)
    store.create_collection("other_model", BUNDLE.manifest.dim, "another-model")
    code, message = code_of(lambda: search(stub, collection="other_model", text="x"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another-model" in message
