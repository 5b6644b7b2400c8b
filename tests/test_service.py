"""The gRPC service at the wire: status codes, health, reflection, streams, shutdown.

A real server on port 0 (in a thread, with its own event loop) and raw generated stubs, so
these tests see exactly what any gRPC client sees. The model is the committed demo bundle, or
the bundle named by CLIPSEARCH_TEST_MODEL (these tests need no particular model).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from image_fixtures import encode, pattern
from server_fixtures import ThreadedServer, acks_of, quick_settings, served_model

from clipsearch.server.app import Components, default_components
from clipsearch.server.encoder import OnnxEncoder
from clipsearch.server.settings import Settings
from clipsearch.server.store import MilvusStore
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

MODEL = served_model()
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def jpeg(seed: int) -> bytes:
    return encode(pattern((96 + seed, 64), seed=seed), "JPEG", quality=90)


def floats(vector: pb.Vector) -> np.ndarray:
    return np.frombuffer(vector.data, dtype="<f4")


def settings(tmp: Path, **overrides: Any) -> Settings:
    return quick_settings(tmp / "store.db", MODEL, **overrides)


def item(seq: int, **fields: Any) -> pb.IngestRequest:
    fields.setdefault("image", jpeg(seq))
    return pb.IngestRequest(items=[pb.IngestItem(seq=seq, **fields)])


def options(collection: str = "c", create: bool = True, skip: bool = False) -> pb.IngestRequest:
    return pb.IngestRequest(
        options=pb.IngestOptions(
            collection=collection, create_collection=create, skip_existing=skip
        )
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with ThreadedServer(settings(tmp_path_factory.mktemp("service"))) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ThreadedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ClipSearchStub:
    return pb_grpc.ClipSearchStub(channel)


@pytest.fixture(scope="module")
def filled(stub: pb_grpc.ClipSearchStub) -> str:
    """A collection of six items, two of them with captions."""
    requests = [options("filled")] + [
        item(i, id=f"item-{i}", caption="a striped pattern" if i < 2 else "",
             metadata_json=json.dumps({"n": i, "even": i % 2 == 0}))
        for i in range(6)
    ]  # fmt: skip
    acks = acks_of(stub.Ingest(iter(requests), timeout=60))
    assert sorted(a.status for a in acks) == [pb.INGEST_STATUS_OK] * 6
    return "filled"


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details()


# --- health and reflection ---------------------------------------------------------------


def test_health_is_serving_for_the_server_and_the_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "clipsearch.v1.ClipSearch"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"clipsearch.v1.ClipSearch", "grpc.health.v1.Health"} <= names
    file_request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="clipsearch.v1.ClipSearch"
    )
    (reply,) = list(reflection.ServerReflectionInfo(iter([file_request]), timeout=5))
    assert reply.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


def test_health_is_not_serving_while_warming_up_and_while_draining(tmp_path: Path) -> None:
    gate = threading.Event()
    base = default_components()

    def slow_encoder(s: Settings) -> OnnxEncoder:
        assert gate.wait(60)
        return base.encoder(s)

    server = ThreadedServer(settings(tmp_path), Components(slow_encoder, base.store))
    try:

        async def start_only() -> int:
            from clipsearch.server.app import ClipSearchServer

            server.server = ClipSearchServer(server.settings, server.components)
            return await server.server.start()

        server.port = server.run(start_only())
        with grpc.insecure_channel(server.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = health_pb2.HealthCheckRequest(service="")
            assert health.Check(check, timeout=5).status == NOT_SERVING
            code, message = code_of(lambda: pb_grpc.ClipSearchStub(ch).Info(pb.InfoRequest()))
            assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in message
            gate.set()
            assert server.server is not None
            server.run(server.server.wait_ready())
            assert health.Check(check, timeout=5).status == SERVING
            # Draining: health flips before the port closes, calls in flight finish.
            watch = health.Watch(check, timeout=30)
            assert next(watch).status == SERVING
            stopping = ThreadPoolExecutor(1).submit(server.run, server.server.stop(1.0))
            assert next(watch).status == NOT_SERVING
            stopping.result(30)
    finally:
        gate.set()
        server.close()


# --- Info and Encode ---------------------------------------------------------------------


def test_info_reports_the_model_and_the_providers_that_run(stub: pb_grpc.ClipSearchStub) -> None:
    info = stub.Info(pb.InfoRequest(), timeout=5)
    assert info.dim > 0 and info.model_id and info.context_length > 1
    assert list(info.text.providers) == ["CPUExecutionProvider"]
    assert info.text.precision in {"int8", "fp32"}
    assert info.store == "milvus-lite" and "onnxruntime" in info.versions
    assert info.timing.total_us > 0


def test_encode_batch_equals_single_and_keeps_input_order(stub: pb_grpc.ClipSearchStub) -> None:
    inputs = [
        pb.EncodeInput(text="a red circle"),
        pb.EncodeInput(image=jpeg(1)),
        pb.EncodeInput(text="红色的圆形"),
        pb.EncodeInput(image=jpeg(2)),
        pb.EncodeInput(text=""),
    ]
    batch = stub.Encode(pb.EncodeRequest(inputs=inputs, request_id=7), timeout=30)
    assert batch.request_id == 7 and len(batch.embeddings) == len(inputs)
    for one, embedding in zip(inputs, batch.embeddings, strict=True):
        single = stub.Encode(pb.EncodeRequest(inputs=[one]), timeout=30).embeddings[0]
        np.testing.assert_allclose(floats(embedding.vector), floats(single.vector), atol=1e-5)
        assert abs(np.linalg.norm(floats(embedding.vector)) - 1.0) < 1e-5
    timing = batch.timing
    assert timing.total_us >= timing.inference_us > 0 and timing.batch_size >= 1


def test_long_text_is_truncated_and_says_so(stub: pb_grpc.ClipSearchStub) -> None:
    long_text = " ".join(["circle"] * 200)
    reply = stub.Encode(
        pb.EncodeRequest(inputs=[pb.EncodeInput(text=long_text), pb.EncodeInput(text="circle")]),
        timeout=30,
    )
    assert [e.truncated for e in reply.embeddings] == [True, False]


def test_encode_stream_answers_in_order_and_survives_a_bad_request(
    stub: pb_grpc.ClipSearchStub,
) -> None:
    requests = [
        pb.EncodeRequest(request_id=i, inputs=[pb.EncodeInput(text=f"shape number {i}")])
        for i in range(20)
    ]
    requests[7] = pb.EncodeRequest(request_id=7, inputs=[pb.EncodeInput(image=b"not an image")])
    replies = list(stub.EncodeStream(iter(requests), timeout=60))
    assert [r.request_id for r in replies] == list(range(20))
    assert replies[7].error and replies[7].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not replies[7].embeddings
    assert all(len(r.embeddings) == 1 and not r.error for i, r in enumerate(replies) if i != 7)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.SearchRequest(collection="filled", text="   "), "INVALID_ARGUMENT", "empty"),
        (pb.SearchRequest(collection="filled"), "INVALID_ARGUMENT", "exactly one query"),
        (pb.SearchRequest(collection="nope", text="x"), "NOT_FOUND", "nope"),
        (
            pb.SearchRequest(collection="filled", text="x", filter='metadata["n"] === 1'),
            "INVALID_ARGUMENT",
            "filter",
        ),
        (
            pb.SearchRequest(collection="filled", vector=pb.Vector(data=b"\0" * 12)),
            "INVALID_ARGUMENT",
            "dimension 3",
        ),
        (
            pb.SearchRequest(collection="filled", image=b"\x89PNG broken"),
            "INVALID_ARGUMENT",
            "image",
        ),
        (pb.SearchRequest(collection="filled", like_id="missing"), "NOT_FOUND", "missing"),
        (
            pb.SearchRequest(collection="filled", text="x", output_fields=["secret"]),
            "INVALID_ARGUMENT",
            "output_fields",
        ),
        (pb.SearchRequest(collection="filled", text="x", top_k=5000), "INVALID_ARGUMENT", "top_k"),
    ],
)
def test_bad_search_requests_get_the_right_code_and_the_server_keeps_serving(
    stub: pb_grpc.ClipSearchStub, filled: str, request_: pb.SearchRequest, code: str, words: str
) -> None:
    got, message = code_of(lambda: stub.Search(request_, timeout=30))
    assert got == grpc.StatusCode[code]
    assert words in message
    assert "Traceback" not in message
    assert stub.Search(pb.SearchRequest(collection=filled, text="ok"), timeout=30).hits


def test_unknown_collection_is_not_found_everywhere(stub: pb_grpc.ClipSearchStub) -> None:
    calls: list[Callable[[], object]] = [
        lambda: stub.Count(pb.CountRequest(collection="ghost"), timeout=10),
        lambda: stub.Get(pb.GetRequest(collection="ghost", ids=["a"]), timeout=10),
        lambda: stub.Delete(pb.DeleteRequest(collection="ghost", ids=["a"]), timeout=10),
        lambda: stub.DropCollection(pb.DropCollectionRequest(name="ghost"), timeout=10),
        lambda: acks_of(stub.Ingest(iter([options("ghost", create=False), item(1)]), timeout=10)),
    ]
    for call in calls:
        code, message = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "ghost" in message


def test_collections_create_list_drop_and_already_exists(stub: pb_grpc.ClipSearchStub) -> None:
    assert stub.CreateCollection(pb.CreateCollectionRequest(name="fresh"), timeout=10).created
    code, _ = code_of(lambda: stub.CreateCollection(pb.CreateCollectionRequest(name="fresh")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    again = stub.CreateCollection(pb.CreateCollectionRequest(name="fresh", exist_ok=True))
    assert not again.created
    listed = {c.name: c for c in stub.ListCollections(pb.ListCollectionsRequest()).collections}
    info = stub.Info(pb.InfoRequest())
    assert listed["fresh"].count == 0 and listed["fresh"].dim == info.dim
    assert listed["fresh"].model_id == info.model_id
    code, message = code_of(lambda: stub.CreateCollection(pb.CreateCollectionRequest(name="a-b")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "a-b" in message
    stub.DropCollection(pb.DropCollectionRequest(name="fresh"), timeout=10)
    names = {c.name for c in stub.ListCollections(pb.ListCollectionsRequest()).collections}
    assert "fresh" not in names


def test_collection_of_another_model_is_refused(server: ThreadedServer, stub: Any) -> None:
    # Milvus Lite allows one client per file: make the foreign collection through the
    # server's own store, as another model's server would have.
    assert server.server is not None and server.server.service.runtime is not None
    runtime = server.server.service.runtime
    runtime.store.store.create_collection("foreign", runtime.dim, "another-model-1234")
    code, message = code_of(lambda: stub.Search(pb.SearchRequest(collection="foreign", text="x")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "another-model-1234" in message


# --- ingest ------------------------------------------------------------------------------


def test_ingest_acks_every_item_and_bad_items_fail_alone(stub: pb_grpc.ClipSearchStub) -> None:
    requests = [
        options("mixed"),
        item(1, id="good-1", caption="a pattern", metadata_json='{"k": 1}'),
        item(2, id="no-image", image=b""),
        item(3, id="bad-json", metadata_json="{not json"),
        item(4, id="not-object", metadata_json="[1, 2]"),
        item(5, id="corrupt", image=b"\xff\xd8\xff garbage"),
        item(6, id="good-2"),
        item(7),  # no id: the content hash
    ]
    acks = {a.seq: a for a in acks_of(stub.Ingest(iter(requests), timeout=60))}
    assert sorted(acks) == [1, 2, 3, 4, 5, 6, 7]
    ok = {s for s, a in acks.items() if a.status == pb.INGEST_STATUS_OK}
    assert ok == {1, 6, 7}
    for seq in (2, 3, 4, 5):
        assert acks[seq].status == pb.INGEST_STATUS_FAILED and acks[seq].error
        assert acks[seq].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(acks[7].id) == 32  # sha256 prefix
    assert stub.Count(pb.CountRequest(collection="mixed"), timeout=10).count == 3
    assert all(a.timing.total_us > 0 for a in acks.values())


def test_reingest_upserts_and_skip_existing_skips(stub: pb_grpc.ClipSearchStub) -> None:
    first = [options("again")] + [item(i, id=f"x{i}") for i in range(4)]
    assert {a.status for a in acks_of(stub.Ingest(iter(first), timeout=60))} == {
        pb.INGEST_STATUS_OK
    }
    updated = [options("again"), item(0, id="x0", caption="now with a caption")]
    acks_of(stub.Ingest(iter(updated), timeout=60))
    assert stub.Count(pb.CountRequest(collection="again")).count == 4
    (got,) = stub.Get(pb.GetRequest(collection="again", ids=["x0"])).items
    assert got.caption == "now with a caption"
    skipping = [options("again", skip=True)] + [item(i, id=f"x{i}") for i in range(3, 6)]
    statuses = {a.id: a.status for a in acks_of(stub.Ingest(iter(skipping), timeout=60))}
    assert statuses == {
        "x3": pb.INGEST_STATUS_SKIPPED,
        "x4": pb.INGEST_STATUS_OK,
        "x5": pb.INGEST_STATUS_OK,
    }
    assert stub.Count(pb.CountRequest(collection="again")).count == 6


def cjk(count: int, start: int = 0) -> str:
    """`count` CJK characters: three UTF-8 bytes each."""
    return "".join(chr(0x4E00 + (start + i) % 20000) for i in range(count))


def test_one_streams_bad_items_never_fail_or_show_in_another_stream(tmp_path: Path) -> None:
    # A long group-commit wait puts both streams' items in the same write batches.
    server_settings = settings(tmp_path, ingest_write_wait_ms=100.0, ingest_write_batch=256)
    good = [item(i, id=f"good-{i}", caption=f"good caption {i}") for i in range(24)]
    bad_items = {
        **{f"id-{i}": {"id": cjk(200, 200 * i)} for i in range(12)},  # 600 bytes > 512
        "uri": {"id": "bad-uri", "uri": cjk(1500)},  # 1500 characters, 4500 bytes
        "caption": {"id": "bad-caption", "caption": cjk(3000)},  # 9000 bytes > 8192
        "control": {"id": "bad-control", "caption": "nul \x00 inside"},
        "deep": {"id": "bad-deep", "metadata_json": "[" * 30_000 + "]" * 30_000},
        "too-deep": {"id": "bad-depth", "metadata_json": '{"a": ' + "[" * 70 + "]" * 70 + "}"},
        "nan": {"id": "bad-nan", "metadata_json": '{"x": NaN}'},
    }
    mixed = [item(100 + n, **fields) for n, fields in enumerate(bad_items.values())] + [
        item(200 + i, id=f"other-{i}") for i in range(6)
    ]
    all_ids = [r.items[0].id for r in good + mixed]
    with (
        ThreadedServer(server_settings) as server,
        grpc.insecure_channel(server.address) as ch,
        ThreadPoolExecutor(2) as pool,
    ):
        stub = pb_grpc.ClipSearchStub(ch)
        runs = [
            pool.submit(lambda r=requests: acks_of(stub.Ingest(iter(r), timeout=120)))
            for requests in ([options("shared"), *good], [options("shared"), *mixed])
        ]
        good_acks, mixed_acks = (run.result() for run in runs)
        count = stub.Count(pb.CountRequest(collection="shared"), timeout=10).count
    assert [(a.status, a.error) for a in good_acks] == [(pb.INGEST_STATUS_OK, "")] * 24
    # The write's time is the store's (search_us), the towers' is inference_us.
    assert all(a.timing.search_us > 0 and a.timing.inference_us > 0 for a in good_acks)
    by_seq = {a.seq: a for a in mixed_acks}
    assert sorted(by_seq) == sorted(r.items[0].seq for r in mixed)
    for seq in range(100, 100 + len(bad_items)):
        ack = by_seq[seq]
        assert ack.status == pb.INGEST_STATUS_FAILED
        assert ack.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], ack.error[:200]
        others = [i for i in all_ids if i != ack.id]
        assert not any(other in ack.error for other in others), ack.error[:200]
    for label, seq in (("id-0", 100), ("uri", 112), ("caption", 113)):
        assert "bytes" in by_seq[seq].error, label
    assert "control character" in by_seq[114].error
    assert "more than 64 levels" in by_seq[116].error  # the depth limit is named
    assert {by_seq[200 + i].status for i in range(6)} == {pb.INGEST_STATUS_OK}
    assert count == 24 + 6


def test_ingest_must_start_with_options(stub: pb_grpc.ClipSearchStub) -> None:
    code, message = code_of(lambda: acks_of(stub.Ingest(iter([item(1)]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "IngestOptions" in message


def test_items_several_to_a_message_each_get_their_own_ack(stub: pb_grpc.ClipSearchStub) -> None:
    together = pb.IngestRequest(
        items=[
            pb.IngestItem(seq=1, id="m1", image=jpeg(1)),
            pb.IngestItem(seq=2, id="m2", image=b"not an image"),
            pb.IngestItem(seq=3, id="m3", image=jpeg(3), caption="three"),
        ]
    )
    single = item(4, id="m4")  # the one-item form, as a client of the earlier protocol sends
    acks = {a.seq: a for a in acks_of(stub.Ingest(iter([options("several"), together, single])))}
    assert sorted(acks) == [1, 2, 3, 4]
    assert [acks[s].status for s in (1, 3, 4)] == [pb.INGEST_STATUS_OK] * 3
    assert acks[2].status == pb.INGEST_STATUS_FAILED and acks[2].error_code == 3
    count = stub.Count(pb.CountRequest(collection="several"), timeout=10).count
    assert count == 3


def test_ingest_messages_must_keep_to_their_roles(stub: pb_grpc.ClipSearchStub) -> None:
    options_with_items = pb.IngestRequest(
        options=pb.IngestOptions(collection="roles", create_collection=True),
        items=[pb.IngestItem(seq=1, image=jpeg(1))],
    )
    empty = pb.IngestRequest()
    for requests in ([options_with_items], [options("roles"), empty], [options("roles")] * 2):
        code, message = code_of(lambda r=requests: acks_of(stub.Ingest(iter(r), timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert "IngestOptions" in message


# --- items -------------------------------------------------------------------------------


def test_get_count_delete(stub: pb_grpc.ClipSearchStub, filled: str) -> None:
    got = stub.Get(
        pb.GetRequest(collection=filled, ids=["item-3", "nope", "item-0"], include_vectors=True)
    )
    assert [i.id for i in got.items] == ["item-3", "item-0"] and list(got.missing_ids) == ["nope"]
    assert json.loads(got.items[1].metadata_json) == {"n": 0, "even": True}
    assert got.items[1].caption == "a striped pattern" and got.items[1].caption_vector.data
    assert not got.items[0].caption_vector.data
    info = stub.Info(pb.InfoRequest())
    assert floats(got.items[0].image_vector).shape == (info.dim,)
    even = stub.Count(pb.CountRequest(collection=filled, filter='metadata["even"] == true'))
    assert even.count == 3
    ingested = [options(filled), item(99, id="to-delete")]
    acks_of(stub.Ingest(iter(ingested), timeout=60))
    deleted = stub.Delete(pb.DeleteRequest(collection=filled, ids=["to-delete", "never-there"]))
    assert deleted.deleted == 1
    assert list(stub.Get(pb.GetRequest(collection=filled, ids=["to-delete"])).missing_ids) == [
        "to-delete"
    ]
    assert stub.Count(pb.CountRequest(collection=filled)).count == 6


def test_search_pages_and_vector_queries(stub: pb_grpc.ClipSearchStub, filled: str) -> None:
    everything = stub.Search(pb.SearchRequest(collection=filled, text="a pattern", top_k=6))
    assert len(everything.hits) == 6
    scores = [h.score for h in everything.hits]
    assert scores == sorted(scores, reverse=True)
    pages = [
        stub.Search(pb.SearchRequest(collection=filled, text="a pattern", top_k=2, offset=o))
        for o in (0, 2, 4)
    ]
    assert [h.id for p in pages for h in p.hits] == [h.id for h in everything.hits]
    # A stored vector as the query finds its own item first, with cosine 1.
    (stored,) = stub.Get(
        pb.GetRequest(collection=filled, ids=["item-4"], include_vectors=True)
    ).items
    by_vector = stub.Search(
        pb.SearchRequest(collection=filled, vector=stored.image_vector, top_k=1)
    )
    assert by_vector.hits[0].id == "item-4" and by_vector.hits[0].score == pytest.approx(
        1, abs=1e-4
    )
    like = stub.Search(pb.SearchRequest(collection=filled, like_id="item-4", top_k=10))
    assert "item-4" not in [h.id for h in like.hits] and len(like.hits) == 5
    captions = stub.Search(
        pb.SearchRequest(collection=filled, text="x", target=pb.TARGET_CAPTION, top_k=10)
    )
    assert sorted(h.id for h in captions.hits) == ["item-0", "item-1"]
    fused = stub.Search(
        pb.SearchRequest(
            collection=filled, text="a striped pattern", target=pb.TARGET_BOTH, top_k=6
        )
    )
    assert len(fused.hits) == 6
    top_two = {h.id for h in fused.hits[:2]}
    assert top_two == {"item-0", "item-1"}  # in both rankings: fused first
    only = stub.Search(
        pb.SearchRequest(collection=filled, text="x", filter='metadata["n"] >= 4', top_k=10,
                         output_fields=["uri"])
    )  # fmt: skip
    assert sorted(h.id for h in only.hits) == ["item-4", "item-5"]
    assert all(h.caption == "" and h.metadata_json == "" for h in only.hits)


# --- failure handling --------------------------------------------------------------------


class BrokenSearchStore:
    """A real store whose search raises a bug-like error."""

    def __init__(self, inner: MilvusStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def search(self, *args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug deep in the store")


def test_unexpected_errors_are_internal_with_a_reference_and_no_traceback(tmp_path: Path) -> None:
    base = default_components()
    components = Components(base.encoder, lambda s: BrokenSearchStore(MilvusStore.from_settings(s)))
    with (
        ThreadedServer(settings(tmp_path), components) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.ClipSearchStub(ch)
        acks_of(stub.Ingest(iter([options("c"), item(1, id="a")]), timeout=60))
        code, message = code_of(lambda: stub.Search(pb.SearchRequest(collection="c", text="x")))
        assert code == grpc.StatusCode.INTERNAL
        assert "ref " in message and "ZeroDivisionError" not in message
        assert "Traceback" not in message
        assert stub.Count(pb.CountRequest(collection="c")).count == 1  # still serving


def slow_vision(seconds: float) -> Components:
    base = default_components()

    def encoder(s: Settings) -> OnnxEncoder:
        enc = base.encoder(s)
        run = enc.run_vision

        def slow(pixels: np.ndarray) -> np.ndarray:
            time.sleep(seconds)
            return run(pixels)

        enc.run_vision = slow  # type: ignore[method-assign]
        return enc

    return Components(encoder, base.store)


def test_full_queue_is_resource_exhausted_and_deadlines_are_kept(tmp_path: Path) -> None:
    server_settings = settings(tmp_path, max_queue=2, max_batch_size=1, max_wait_ms=0.0)
    with (
        ThreadedServer(server_settings, slow_vision(0.3)) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.ClipSearchStub(ch)
        request = pb.EncodeRequest(inputs=[pb.EncodeInput(image=jpeg(3))])
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stub.Encode, request, timeout=30) for _ in range(8)]
            codes = []
            for future in futures:
                try:
                    future.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)  # type: ignore[attr-defined]
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        code, _ = code_of(lambda: stub.Encode(request, timeout=0.1))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(stub.Encode(request, timeout=30).embeddings) == 1  # and still serving


def test_graceful_stop_lets_calls_in_flight_finish(tmp_path: Path) -> None:
    server = ThreadedServer(settings(tmp_path), slow_vision(1.0))
    server.start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.ClipSearchStub(ch)
            request = pb.EncodeRequest(inputs=[pb.EncodeInput(image=jpeg(5))])
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(stub.Encode, request, timeout=30)
                time.sleep(0.3)  # the call is now inside the slow inference
                server.stop(grace=10.0)
                assert len(in_flight.result().embeddings) == 1
    finally:
        server.close()


def test_token_auth_guards_calls_but_not_health(tmp_path: Path) -> None:
    with (
        ThreadedServer(settings(tmp_path, auth_token="s3cret")) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.ClipSearchStub(ch)
        code, message = code_of(lambda: stub.Info(pb.InfoRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in message
        code, _ = code_of(
            lambda: stub.Info(pb.InfoRequest(), metadata=[("authorization", "Bearer wrong")])
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Info(pb.InfoRequest(), metadata=[("authorization", "Bearer s3cret")]).dim
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        code, _ = code_of(lambda: list(stub.EncodeStream(iter([pb.EncodeRequest()]), timeout=5)))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_start_up_logs_no_dependency_chatter(tmp_path: Path) -> None:
    code = (
        "import logging, sys\n"
        "from clipsearch.server.app import configure_logging\n"
        "from clipsearch.server.store import MilvusStore\n"
        "configure_logging('info')\n"
        "MilvusStore(sys.argv[1]).close()\n"
        "print(logging.getLogger('pymilvus').level)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "quiet.db")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "faiss" not in run.stderr  # no "Loading faiss with AVX2 support" lines
    assert "Milvus Lite " in run.stderr  # the store's own INFO lines remain
    assert "served on unix:" in run.stderr
    assert run.stdout.strip() == str(logging.CRITICAL)


def test_memory_store_serves_the_real_model_and_keeps_nothing_on_disk(tmp_path: Path) -> None:
    with (
        ThreadedServer(settings(tmp_path, milvus_uri="memory:")) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        memory = pb_grpc.ClipSearchStub(channel)
        assert memory.Info(pb.InfoRequest(), timeout=10).store == "memory"
        requests = [options("kept")] + [item(i, id=f"k{i}") for i in range(3)]
        acks = acks_of(memory.Ingest(iter(requests), timeout=60))
        assert [a.status for a in acks] == [pb.INGEST_STATUS_OK] * 3
        found = memory.Search(pb.SearchRequest(collection="kept", image=jpeg(1), top_k=1))
        assert [hit.id for hit in found.hits] == ["k1"]
    assert list(tmp_path.iterdir()) == []  # no Milvus Lite file was made


# --- ingest protocol abuse ---------------------------------------------------------------


def test_a_message_mixing_good_and_bad_items_fails_only_the_bad_ones(
    stub: pb_grpc.ClipSearchStub,
) -> None:
    mixed = pb.IngestRequest(
        items=[
            pb.IngestItem(seq=1, id="x1", image=jpeg(1)),
            pb.IngestItem(seq=2, id="x2", image=b"\xff\xd8 not a jpeg"),
            pb.IngestItem(seq=3, id="x3", image=jpeg(3), metadata_json="{not json"),
            pb.IngestItem(seq=4, id="x" * 600, image=jpeg(4)),
            pb.IngestItem(seq=5, id="dup", image=jpeg(5)),
            pb.IngestItem(seq=6, id="dup", image=jpeg(6), caption="second"),
            pb.IngestItem(seq=7, id="x7", image=jpeg(7)),
            pb.IngestItem(seq=7, id="x7b", image=jpeg(8)),
        ]
    )
    acks = acks_of(stub.Ingest(iter([options("one_message"), mixed]), timeout=60))
    assert sorted(a.seq for a in acks) == [1, 2, 3, 4, 5, 6, 7, 7]
    status = {(a.seq, a.id): a.status for a in acks}
    failed = {key for key, s in status.items() if s == pb.INGEST_STATUS_FAILED}
    assert {seq for seq, _ in failed} == {2, 3, 4}
    assert all(a.error_code == 3 for a in acks if a.status == pb.INGEST_STATUS_FAILED)
    assert stub.Count(pb.CountRequest(collection="one_message"), timeout=10).count == 4
    got = stub.Get(
        pb.GetRequest(collection="one_message", ids=["x1", "dup", "x7", "x7b"]), timeout=10
    )
    assert sorted(i.id for i in got.items) == ["dup", "x1", "x7", "x7b"]
    assert [i.caption for i in got.items if i.id == "dup"] == ["second"]


def test_items_acked_before_a_protocol_error_stay_stored(stub: pb_grpc.ClipSearchStub) -> None:
    for late in (pb.IngestRequest(), options("kept")):
        acked = threading.Event()

        def requests(late: pb.IngestRequest = late, acked: threading.Event = acked) -> Any:
            yield options("kept")
            yield item(1, id="kept-1")
            assert acked.wait(60)
            yield late

        got: list[pb.IngestAck] = []

        def run(
            r: Any = requests, a: threading.Event = acked, got: list[pb.IngestAck] = got
        ) -> None:
            for response in stub.Ingest(r(), timeout=60):
                got.extend(response.acks)
                a.set()

        code, message = code_of(run)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "IngestOptions" in message
        assert [(a.id, a.status) for a in got] == [("kept-1", pb.INGEST_STATUS_OK)]
        stored = stub.Get(pb.GetRequest(collection="kept", ids=["kept-1"]), timeout=10)
        assert [i.id for i in stored.items] == ["kept-1"]


def test_a_message_of_more_items_than_the_window_and_one_too_large(tmp_path: Path) -> None:
    small_settings = settings(tmp_path, ingest_window=4, max_message_mb=1)
    with ThreadedServer(small_settings) as small, grpc.insecure_channel(small.address) as ch:
        tiny = pb_grpc.ClipSearchStub(ch)
        many = pb.IngestRequest(
            items=[pb.IngestItem(seq=i, id=f"w{i}", image=jpeg(i)) for i in range(20)]
        )
        acks = acks_of(tiny.Ingest(iter([options("w"), many]), timeout=60))
        assert sorted(a.seq for a in acks) == list(range(20))
        assert {a.status for a in acks} == {pb.INGEST_STATUS_OK}
        huge = item(99, id="huge", image=b"\0" * (1024 * 1024 + 1))
        code, _ = code_of(lambda: acks_of(tiny.Ingest(iter([options("w"), huge]), timeout=30)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert tiny.Count(pb.CountRequest(collection="w"), timeout=10).count == 20
