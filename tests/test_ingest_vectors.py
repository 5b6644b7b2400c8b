"""Ingest of items carrying vectors computed elsewhere: stored as sent (normalized), never
encoded, checked per item, refused for a collection of another model.

Two servers on port 0: the fake service (a FakeBackend whose calls are counted, an
InMemoryStore) for the rules, and the real one (the demo model on ONNX Runtime, Milvus
Lite) for the client API, the Parquet command line and the encoder counters.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_fixtures import encode, pattern
from server_fixtures import ThreadedServer, acks_of, quick_settings, served_model

from clipsearch.cli import main
from clipsearch.client import AsyncClient, Client, IngestItem
from clipsearch.client.errors import FailedPrecondition
from clipsearch.client.parquet import parquet_items, vectors_schema
from clipsearch.client.sources import RowError, open_source
from clipsearch.server.app import Components, fake_components
from clipsearch.server.bundle import load_bundle
from clipsearch.server.fake import FakeBackend
from clipsearch.server.settings import Settings
from clipsearch.server.store.memory import InMemoryStore
from clipsearch.server.text import TextTokenizer
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

BUNDLE = load_bundle(served_model())
DIM = BUNDLE.manifest.dim
MODEL_ID = BUNDLE.manifest.model_id
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def wire(vector: np.ndarray) -> pb.Vector:
    return pb.Vector(data=np.asarray(vector, dtype="<f4").tobytes())


def floats(vector: pb.Vector) -> np.ndarray:
    return np.frombuffer(vector.data, dtype="<f4")


def jpeg(seed: int) -> bytes:
    return encode(pattern((72 + seed, 64), seed=seed), "JPEG", quality=90)


def options(collection: str, model_id: str = MODEL_ID) -> pb.IngestRequest:
    return pb.IngestRequest(
        options=pb.IngestOptions(
            collection=collection, create_collection=True, vectors_model_id=model_id
        )
    )


def item(seq: int, **fields: Any) -> pb.IngestRequest:
    return pb.IngestRequest(items=[pb.IngestItem(seq=seq, **fields)])


# --- the rules, on the fake service ---------------------------------------------------------


class CountedFakes:
    """The fake service's components, keeping the backend to count its calls."""

    def __init__(self) -> None:
        self.backend: FakeBackend | None = None

    def components(self) -> Components:
        def encoder(settings: Settings) -> FakeBackend:
            self.backend = FakeBackend.for_manifest(BUNDLE.manifest)
            return self.backend

        return Components(encoder=encoder, store=lambda settings: InMemoryStore())

    @property
    def encoded(self) -> int:
        """Rows the towers have encoded so far (texts and images)."""
        assert self.backend is not None
        return sum(self.backend.batch_sizes)


@pytest.fixture(scope="module")
def fakes() -> CountedFakes:
    return CountedFakes()


@pytest.fixture(scope="module")
def stub(fakes: CountedFakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    settings = quick_settings(tmp_path_factory.mktemp("fake") / "unused.db", served_model())
    with (
        ThreadedServer(settings, fakes.components()) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield pb_grpc.ClipSearchStub(channel)


def fake_text(text: str) -> np.ndarray:
    tokenizer = TextTokenizer.from_bundle(BUNDLE)
    backend = FakeBackend.for_manifest(BUNDLE.manifest)
    return backend.run_text(tokenizer.pad(tokenizer.tokenize([text])))[0]


def test_carried_vectors_are_stored_as_sent_and_never_encoded(
    stub: Any, fakes: CountedFakes
) -> None:
    before = fakes.encoded
    captioned = {i: {"caption": f"caption {i}", "caption_vector": wire(unit(100 + i))}
                 for i in range(1, 10, 2)}  # fmt: skip
    requests = [options("carried")] + [
        item(i, id=f"v{i}", uri=f"s3://bucket/{i}.jpg", metadata_json=json.dumps({"n": i}),
             image_vector=wire(unit(i)), **captioned.get(i, {}))
        for i in range(10)
    ]  # fmt: skip
    acks = acks_of(stub.Ingest(iter(requests), timeout=30))
    assert sorted((a.seq, a.status) for a in acks) == [(i, pb.INGEST_STATUS_OK) for i in range(10)]
    assert all(a.timing.inference_us == 0 and a.timing.preprocess_us == 0 for a in acks)
    assert fakes.encoded == before  # no tower ran
    assert stub.Count(pb.CountRequest(collection="carried"), timeout=5).count == 10
    ids = [f"v{i}" for i in range(10)]
    got = stub.Get(pb.GetRequest(collection="carried", ids=ids, include_vectors=True)).items
    for i, stored in enumerate(got):
        assert (stored.id, stored.uri, json.loads(stored.metadata_json)) == (
            f"v{i}",
            f"s3://bucket/{i}.jpg",
            {"n": i},
        )
        np.testing.assert_array_equal(floats(stored.image_vector), unit(i))
        if i % 2:
            np.testing.assert_array_equal(floats(stored.caption_vector), unit(100 + i))
        else:
            assert not stored.caption_vector.data
    for i in (0, 7):
        query = pb.SearchRequest(collection="carried", vector=wire(unit(i)), top_k=3)
        top = stub.Search(query, timeout=5).hits[0]
        assert top.id == f"v{i}" and top.score == pytest.approx(1.0, abs=1e-5)
    caption_query = pb.SearchRequest(
        collection="carried", vector=wire(unit(103)), target=pb.TARGET_CAPTION, top_k=1
    )
    assert [h.id for h in stub.Search(caption_query, timeout=5).hits] == ["v3"]


def test_a_vector_off_unit_length_is_normalized(stub: Any) -> None:
    scaled = unit(5) * 7.5
    (ack,) = acks_of(
        stub.Ingest(iter([options("scaled"), item(0, id="s", image_vector=wire(scaled))]))
    )
    assert ack.status == pb.INGEST_STATUS_OK
    (stored,) = stub.Get(pb.GetRequest(collection="scaled", ids=["s"], include_vectors=True)).items
    np.testing.assert_allclose(floats(stored.image_vector), unit(5), atol=1e-6)


def test_a_mixed_stream_encodes_only_what_came_without_vectors(
    stub: Any, fakes: CountedFakes
) -> None:
    before = fakes.encoded
    requests = [
        options("mixed"),
        item(0, id="vector", image_vector=wire(unit(0))),
        item(1, id="image", image=jpeg(1), caption="a caption to encode"),
        item(2, id="vector-and-text", image_vector=wire(unit(2)), caption="encode me"),
        item(3, id="image-and-caption-vector", image=jpeg(3), caption="given",
             caption_vector=wire(unit(3))),
        item(4, id="image-only", image=jpeg(4)),
    ]  # fmt: skip
    acks = {a.id: a for a in acks_of(stub.Ingest(iter(requests), timeout=30))}
    assert {a.status for a in acks.values()} == {pb.INGEST_STATUS_OK}
    # Encoded: images 1, 3, 4 and the captions of items 1 and 2.
    assert fakes.encoded - before == 5
    ids = list(acks)
    got = {
        g.id: g
        for g in stub.Get(pb.GetRequest(collection="mixed", ids=ids, include_vectors=True)).items
    }
    np.testing.assert_array_equal(floats(got["vector"].image_vector), unit(0))
    np.testing.assert_array_equal(floats(got["vector-and-text"].image_vector), unit(2))
    np.testing.assert_array_equal(
        floats(got["vector-and-text"].caption_vector), fake_text("encode me")
    )
    np.testing.assert_array_equal(floats(got["image-and-caption-vector"].caption_vector), unit(3))
    assert stub.Count(pb.CountRequest(collection="mixed"), timeout=5).count == 5


def test_each_bad_vector_fails_alone_with_its_reason(stub: Any) -> None:
    nan, inf = unit(1).copy(), unit(2).copy()
    nan[3], inf[0] = np.nan, np.inf
    requests = [
        options("bad"),
        item(0, id="good-0", image_vector=wire(unit(10))),
        item(1, id="short", image_vector=wire(unit(1, DIM - 1))),
        item(2, id="nan", image_vector=wire(nan)),
        item(3, id="inf", image_vector=wire(inf)),
        item(4, id="zero", image_vector=wire(np.zeros(DIM, np.float32))),
        item(5, id="ragged", image_vector=pb.Vector(data=b"\x00" * (4 * DIM + 2))),
        item(6, id="caption-short", image_vector=wire(unit(6)), caption="c",
             caption_vector=wire(unit(6, DIM + 1))),
        item(7, id="caption-vector-without-caption", image_vector=wire(unit(7)),
             caption_vector=wire(unit(8))),
        item(8, image_vector=wire(unit(9))),  # no id
        item(9, id="good-9", image_vector=wire(unit(19)), caption="ok",
             caption_vector=wire(unit(29))),
    ]  # fmt: skip
    acks = {a.seq: a for a in acks_of(stub.Ingest(iter(requests), timeout=30))}
    assert sorted(acks) == list(range(10))
    assert {s for s, a in acks.items() if a.status == pb.INGEST_STATUS_OK} == {0, 9}
    for seq in range(1, 9):
        assert (acks[seq].status, acks[seq].error_code) == (pb.INGEST_STATUS_FAILED, INVALID)
    reasons = {seq: acks[seq].error for seq in range(1, 9)}
    assert f"dimension {DIM - 1}" in reasons[1] and str(DIM) in reasons[1]
    assert "NaN or infinity" in reasons[2] and "NaN or infinity" in reasons[3]
    assert "zero vector" in reasons[4]
    assert "whole number of float32s" in reasons[5]
    assert "caption vector" in reasons[6] and f"dimension {DIM + 1}" in reasons[6]
    assert "no caption" in reasons[7]
    assert "needs an id" in reasons[8]
    assert stub.Count(pb.CountRequest(collection="bad"), timeout=5).count == 2


def test_vectors_need_the_stream_to_name_their_model(stub: Any) -> None:
    requests = [
        options("unnamed", model_id=""),
        item(0, id="vector", image_vector=wire(unit(0))),
        item(1, id="image", image=jpeg(1)),
    ]
    acks = {a.id: a for a in acks_of(stub.Ingest(iter(requests), timeout=30))}
    assert acks["image"].status == pb.INGEST_STATUS_OK
    assert (acks["vector"].status, acks["vector"].error_code) == (pb.INGEST_STATUS_FAILED, INVALID)
    assert "vectors_model_id" in acks["vector"].error


def refused(stub: Any, requests: list[pb.IngestRequest]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        acks_of(stub.Ingest(iter(requests), timeout=30))
    error: Any = info.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details: str = error.details()
    return details


def test_vectors_of_another_model_are_refused_before_any_item(stub: Any) -> None:
    other = options("other", model_id="someone-elses-model")
    details = refused(stub, [other, item(0, id="v", image_vector=wire(unit(0)))])
    assert "someone-elses-model" in details and MODEL_ID in details
    with pytest.raises(grpc.RpcError) as info:  # not created for nothing
        stub.Count(pb.CountRequest(collection="other"), timeout=5)
    missing: Any = info.value
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    existing = [options("existing"), item(0, id="i", image=jpeg(0))]
    assert [a.status for a in acks_of(stub.Ingest(iter(existing), timeout=30))] == [
        pb.INGEST_STATUS_OK
    ]
    details = refused(stub, [options("existing", model_id="nope"), item(1, id="j", image=jpeg(1))])
    assert "nope" in details and MODEL_ID in details
    assert stub.Count(pb.CountRequest(collection="existing"), timeout=5).count == 1


def test_a_collection_created_for_vectors_takes_the_served_model_that_made_them(
    tmp_path: Path,
) -> None:
    zh = load_bundle(served_model().parent / "demo-zh").manifest
    settings = quick_settings(
        tmp_path / "unused.db",
        models=f"demo={served_model()},zh={served_model().parent / 'demo-zh'}",
    )
    with (
        ThreadedServer(settings, fake_components()) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.ClipSearchStub(channel)
        requests = [options("for_zh", model_id=zh.model_id)]
        requests += [item(i, id=f"z{i}", image_vector=wire(unit(i, zh.dim))) for i in range(3)]
        acks = acks_of(stub.Ingest(iter(requests), timeout=30))
        assert [a.status for a in acks] == [pb.INGEST_STATUS_OK] * 3
        (listed,) = [
            c
            for c in stub.ListCollections(pb.ListCollectionsRequest(), timeout=5).collections
            if c.name == "for_zh"
        ]
        assert (listed.model_id, listed.count) == (zh.model_id, 3)
        # The default model's vectors into it: refused, naming both.
        details = refused(stub, [options("for_zh"), item(9, id="d", image_vector=wire(unit(9)))])
        assert MODEL_ID in details and zh.model_id in details


# --- the client API and the Parquet command line, on ONNX Runtime and Milvus Lite ------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    settings = quick_settings(tmp_path_factory.mktemp("real") / "vectors.db", served_model())
    with ThreadedServer(settings) as running:
        yield running


def encoder_items(client: Client) -> int:
    return sum(b.items for b in client.info().batchers)


def test_client_ingest_of_vectors_is_searched_exactly_and_encodes_nothing(
    server: ThreadedServer,
) -> None:
    with Client(server.address) as client:
        model_id = client.info().model_id
        assert model_id == MODEL_ID
        before = encoder_items(client)
        items = [
            IngestItem(id=f"c{i}", image_vector=unit(i).tolist(), uri=f"https://x/{i}.jpg",
                       metadata={"i": i})
            for i in range(50)
        ]  # fmt: skip
        summary = client.ingest(items, collection="client_vectors", vectors_model_id=model_id).run()
        assert (summary.ok, summary.failed) == (50, 0)
        assert client.count(collection="client_vectors") == 50
        for i in (0, 17, 49):
            hits = client.search(vector=unit(i), top_k=2, collection="client_vectors").hits
            assert hits[0].id == f"c{i}" and hits[0].score == pytest.approx(1.0, abs=1e-5)
            assert (hits[0].uri, hits[0].metadata) == (f"https://x/{i}.jpg", {"i": i})
        assert encoder_items(client) == before

        wrong = [IngestItem(id="w", image_vector=unit(1))]
        with pytest.raises(FailedPrecondition, match="not-it") as info:
            client.ingest(wrong, collection="client_vectors", vectors_model_id="not-it").run()
        assert MODEL_ID in str(info.value)
        assert client.count(collection="client_vectors") == 50


def test_the_async_client_ingests_vectors_too(server: ThreadedServer) -> None:
    async def run() -> tuple[int, int]:
        async with AsyncClient(server.address) as client:
            items = [IngestItem(id=f"a{i}", image_vector=unit(200 + i)) for i in range(8)]
            stream = client.ingest(items, collection="async_vectors", vectors_model_id=MODEL_ID)
            summary = await stream.run()
            return summary.ok, await client.count(collection="async_vectors")

    assert asyncio.run(run()) == (8, 8)


def test_both_faces_ingest_with_one_signature() -> None:
    sync = inspect.signature(Client.ingest).parameters
    aio = inspect.signature(AsyncClient.ingest).parameters
    assert list(sync) == list(aio)
    assert "vectors_model_id" in sync
    for name in sync:
        if name != "items":
            assert sync[name].default == aio[name].default, name


def test_an_item_takes_exactly_one_image_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        IngestItem(id="x", image=b"jpeg", image_vector=[1.0, 0.0])
    with pytest.raises(ValueError, match="exactly one"):
        IngestItem(id="x")


def write_parquet(path: Path, rows: list[dict[str, Any]], model_id: str | None) -> Path:
    schema = vectors_schema(model_id)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=64)
    return path


def parquet_row(i: int, **overrides: Any) -> dict[str, Any]:
    row = {
        "id": f"p{i}",
        "uri": f"s3://gallery/{i}.jpg",
        "caption": f"picture {i}" if i % 3 == 0 else None,
        "metadata": json.dumps({"i": i, "odd": i % 2 == 1}),
        "image_vector": unit(1000 + i).tolist(),
        "caption_vector": unit(2000 + i).tolist() if i % 3 == 0 else None,
    }
    return {**row, **overrides}


def test_the_parquet_reader_gives_items_with_their_vectors(tmp_path: Path) -> None:
    rows = [parquet_row(i) for i in range(150)] + [parquet_row(150, metadata="{broken")]
    path = write_parquet(tmp_path / "v.parquet", rows, MODEL_ID)
    source = open_source(path)
    assert (source.kind, source.total, source.model_id) == ("parquet", 151, MODEL_ID)
    items = parquet_items(path)
    got = [next(items) for _ in range(150)]
    with pytest.raises(RowError, match="metadata is not valid JSON"):
        next(items)
    assert [g.id for g in got] == [f"p{i}" for i in range(150)]
    for i in (0, 64, 149):  # across record batches
        np.testing.assert_array_equal(got[i].image_vector, unit(1000 + i))
        assert got[i].metadata == {"i": i, "odd": i % 2 == 1}
    np.testing.assert_array_equal(got[3].caption_vector, unit(2003))
    assert (got[3].caption, got[4].caption, got[4].caption_vector) == ("picture 3", "", None)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def test_clipsearch_ingest_parquet_end_to_end(
    server: ThreadedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 300
    rows = [parquet_row(i) for i in range(n)]
    rows.append(parquet_row(n, id="bad-dim", image_vector=unit(1, DIM + 3).tolist()))
    path = write_parquet(tmp_path / "gallery.parquet", rows, MODEL_ID)
    at = ("--server", server.address, "--collection", "parquet_vectors")
    with Client(server.address) as client:
        before = encoder_items(client)
        code, summary = run_cli(capsys, "ingest", str(path), "--quiet", "--json", *at)
        assert code == 1  # one row failed
        assert (summary["ok"], summary["failed"]) == (n, 1)
        [error] = summary["errors"]
        assert error["id"] == "bad-dim" and f"dimension {DIM + 3}" in error["error"]
        # captions came with their vectors: nothing was encoded
        assert encoder_items(client) == before
        assert client.count(collection="parquet_vectors") == n
        assert (
            client.count(filter='metadata["odd"] == true', collection="parquet_vectors") == n // 2
        )
        for i in (0, 123, n - 1):
            top = client.search(vector=unit(1000 + i), top_k=1, collection="parquet_vectors").hits[
                0
            ]
            assert top.id == f"p{i}" and top.score == pytest.approx(1.0, abs=1e-5)
        caption_hit = client.search(
            vector=unit(2000 + 99), target="caption", top_k=1, collection="parquet_vectors"
        ).hits[0]
        assert (caption_hit.id, caption_hit.caption) == ("p99", "picture 99")

    # No model id in the file: --vectors-model-id names it, and a wrong one is refused.
    bare = write_parquet(tmp_path / "bare.parquet", [parquet_row(i) for i in range(5)], None)
    code, summary = run_cli(capsys, "ingest", str(bare), "--quiet", "--json", *at,
                            "--vectors-model-id", MODEL_ID)  # fmt: skip
    assert (code, summary["ok"]) == (0, 5)
    assert main(["ingest", str(bare), "--quiet", *at, "--vectors-model-id", "elsewhere"]) != 0
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "elsewhere" in err


def test_bulk_reads_parquet_with_the_same_reader_and_leaves_vector_rows_to_ingest(
    tmp_path: Path,
) -> None:
    from clipsearch.bulk.sources import work_rows

    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    rows = [
        {"id": "a", "path": "a.jpg", "caption": "one", "metadata": '{"k": 1}', "extra": 5,
         "image_vector": None},
        {"id": "v", "path": None, "caption": None, "metadata": None, "extra": 6,
         "image_vector": unit(1).tolist()},
        {"id": "b", "path": None, "caption": None, "metadata": "{no", "extra": 7,
         "image_vector": None},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    got = list(work_rows(tmp_path / "mixed.parquet"))
    where = f"{tmp_path / 'mixed.parquet'}"
    assert [(r["label"], r["error"]) for r in got] == [
        ("a", ""),
        (f"{where}:2", "the row carries its image vector: `clipsearch ingest` it"),
        (f"{where}:3", "metadata is not valid JSON: Expecting property name enclosed in double "
                       "quotes"),
    ]  # fmt: skip
    assert got[0]["path"] == str((tmp_path / "a.jpg").resolve())
    assert json.loads(got[0]["metadata"]) == {"k": 1, "extra": 5}


def test_fixed_size_and_float64_vector_columns_read_the_same(tmp_path: Path) -> None:
    vectors = np.stack([unit(i) for i in range(5)])
    table = pa.table(
        {
            "id": [f"f{i}" for i in range(5)],
            "image_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            "caption_vector": pa.array([None, None, None, unit(9).astype(np.float64), None]),
            "caption": [None, None, None, "nine", None],
        }
    )
    pq.write_table(table, tmp_path / "fixed.parquet")
    got = list(parquet_items(tmp_path / "fixed.parquet"))
    for i, item_ in enumerate(got):
        np.testing.assert_array_equal(item_.image_vector, vectors[i])
    np.testing.assert_array_equal(got[3].caption_vector, unit(9))
    assert [g.caption_vector is None for g in got] == [True, True, True, False, True]


def test_bench_ingest_vectors_cli_prints_its_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ingest-vectors", "--count", "40", "--no-server", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dim"] == 128
    assert report["ingest_lite_items_per_s"] > 0 and report["raw_upsert_lite_items_per_s"] > 0
    assert report["ingest_vs_raw_lite"] == pytest.approx(
        report["ingest_lite_items_per_s"] / report["raw_upsert_lite_items_per_s"], abs=0.01
    )
    assert report["ingest_server_items_per_s"] is None and report["ingest_vs_raw_server"] is None
