"""The bad-input table: malformed, oversized and hostile requests at the wire, each with the
status code it must get, against a real server on port 0 (InMemoryStore and Milvus Lite),
and after each one a health check and a good search that must still succeed.

The same case list makes the table in docs/RELIABILITY.md, so the two cannot drift:

    python tests/test_bad_input.py --markdown

prints it, and `test_the_reliability_doc_lists_every_case` fails when the doc is stale.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from image_fixtures import encode, pattern, png_header_only
from server_fixtures import ThreadedServer, acks_of, quick_settings, served_model

from clipsearch.server.app import Components, fake_components
from clipsearch.server.limits import (
    MAX_FILTER_BOOLEAN_OPERATORS,
    MAX_FILTER_BYTES,
    MAX_FILTER_DEPTH,
    MAX_RESULT_WINDOW,
)
from clipsearch.server.settings import Settings
from clipsearch.server.store import MilvusStore
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

DOC = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"
DEFAULTS = Settings()
GALLERY = "gallery"
SERVICE = "/clipsearch.v1.ClipSearch/"
Code = grpc.StatusCode


@dataclass
class Wire:
    """What a case sends through: the typed stub, the raw channel, the server's dim."""

    stub: pb_grpc.ClipSearchStub
    channel: grpc.Channel
    dim: int

    def raw_unary(self, method: str, body: bytes) -> None:
        self.channel.unary_unary(SERVICE + method)(body, timeout=10)

    def raw_stream(self, method: str, bodies: list[bytes]) -> list[bytes]:
        return list(self.channel.stream_stream(SERVICE + method)(iter(bodies), timeout=10))


@dataclass(frozen=True)
class Case:
    call: str  # the RPC
    input: str  # what is sent (Markdown)
    expected: grpc.StatusCode
    send: Callable[[Wire], grpc.StatusCode | None]  # None: the call's own status decides
    reported: str = "the call's status"  # or a reply field

    @property
    def id(self) -> str:
        return f"{self.call}: {self.input}"


def jpeg(seed: int) -> bytes:
    return encode(pattern((64 + seed, 48), seed=seed), "JPEG", quality=90)


def bad_utf8(message: Any, field_value: str) -> bytes:
    """`message` serialized, with `field_value` (a string field's content) made invalid UTF-8."""
    raw: bytes = message.SerializeToString()
    marker = field_value.encode()
    assert raw.count(marker) == 1
    return raw.replace(marker, b"\xff" * len(marker))


def rpc(method: str, request: Any) -> Callable[[Wire], None]:
    """A unary call of `method` with `request`: its status decides."""

    def send(wire: Wire) -> None:
        getattr(wire.stub, method)(request, timeout=10)

    return send


def raw(method: str, body: Callable[[Wire], bytes]) -> Callable[[Wire], None]:
    """A unary call of `method` with raw bytes (what no stub would send)."""

    def send(wire: Wire) -> None:
        wire.raw_unary(method, body(wire))

    return send


def raw_stream(method: str, *requests: Any) -> Callable[[Wire], None]:
    """A stream of messages and raw bytes to `method`: its status decides."""

    def send(wire: Wire) -> None:
        bodies = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
        wire.raw_stream(method, bodies)

    return send


def encode_call(*inputs: pb.EncodeInput) -> Callable[[Wire], None]:
    def send(wire: Wire) -> None:
        wire.stub.Encode(pb.EncodeRequest(inputs=list(inputs)), timeout=10)

    return send


def search_call(**fields: Any) -> Callable[[Wire], None]:
    fields.setdefault("collection", GALLERY)

    def send(wire: Wire) -> None:
        if "vector" not in fields and not {"text", "image", "like_id"} & set(fields):
            fields_ = {**fields, "vector": pb.Vector(data=unit(wire.dim).tobytes())}
        else:
            fields_ = fields
        wire.stub.Search(pb.SearchRequest(**fields_), timeout=10)

    return send


def vector_search(data: Callable[[int], bytes]) -> Callable[[Wire], None]:
    def send(wire: Wire) -> None:
        request = pb.SearchRequest(collection=GALLERY, vector=pb.Vector(data=data(wire.dim)))
        wire.stub.Search(request, timeout=10)

    return send


def unit(dim: int) -> np.ndarray:
    return np.full(dim, 1 / np.sqrt(dim), dtype="<f4")


def ingest_ack(**item: Any) -> Callable[[Wire], grpc.StatusCode]:
    """One item in a fresh stream; the code its ack carries (OK for an OK ack)."""
    item.setdefault("image", jpeg(1))

    def send(wire: Wire) -> grpc.StatusCode:
        requests = [
            pb.IngestRequest(
                options=pb.IngestOptions(collection="ingested", create_collection=True)
            ),
            pb.IngestRequest(items=[pb.IngestItem(seq=1, **item)]),
        ]
        (ack,) = acks_of(wire.stub.Ingest(iter(requests), timeout=30))
        if ack.status == pb.INGEST_STATUS_OK:
            return Code.OK
        return _code(ack.error_code)

    return send


def encode_stream_reply(request: pb.EncodeRequest) -> Callable[[Wire], grpc.StatusCode]:
    """The code of the one response's error field (the stream itself goes on)."""

    def send(wire: Wire) -> grpc.StatusCode:
        (response,) = wire.stub.EncodeStream(iter([request]), timeout=10)
        return _code(response.error_code) if response.error else Code.OK

    return send


def _code(value: int) -> grpc.StatusCode:
    return next(code for code in Code if code.value[0] == value)


def nested(depth: int, term: str = 'id == "x"') -> str:
    return "(" * depth + term + ")" * depth


def text_of_bytes(size: int, char: str = "a") -> str:
    return char * (size // len(char.encode()))


OVER_TEXT = DEFAULTS.max_text_bytes + 1
FILTER_OVER_BYTES = 'id in ["' + "x" * MAX_FILTER_BYTES + '"]'
MANY_ORS = " or ".join(['id == "x"'] * (MAX_FILTER_BOOLEAN_OPERATORS + 2))
OVER_INPUTS = DEFAULTS.max_inputs_per_request + 1
IA, NF = Code.INVALID_ARGUMENT, Code.NOT_FOUND
ENCODE_TEXT = pb.EncodeRequest(inputs=[pb.EncodeInput(text="TEXT")])
# 60 KB of metadata, 30,000 arrays deep: within the size limit, far past the depth one.
DEEP_METADATA = '{"a":' + "[" * 30_000 + "]" * 30_000 + "}"

CASES: list[Case] = [
    # --- Encode
    Case("Encode", "no inputs", IA, encode_call()),
    Case("Encode", "an input with neither text nor image", IA, encode_call(pb.EncodeInput())),
    Case("Encode", "an empty image (0 bytes)", IA, encode_call(pb.EncodeInput(image=b""))),
    Case("Encode", "random bytes as an image", IA, encode_call(pb.EncodeInput(image=b"\x00" * 99))),
    Case("Encode", "a truncated JPEG", IA, encode_call(pb.EncodeInput(image=jpeg(2)[:300]))),
    Case("Encode", "a PNG header claiming 100,000 × 100,000 pixels", IA,
         encode_call(pb.EncodeInput(image=png_header_only(100_000, 100_000)))),
    Case("Encode", "a PDF as an image", IA,
         encode_call(pb.EncodeInput(image=b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"0" * 64))),
    Case("Encode", f"a text of {OVER_TEXT} bytes (max_text_bytes + 1)", IA,
         encode_call(pb.EncodeInput(text=text_of_bytes(OVER_TEXT)))),
    Case("Encode", f"a CJK text of {OVER_TEXT + 2} bytes, {(OVER_TEXT + 2) // 3} characters", IA,
         encode_call(pb.EncodeInput(text=text_of_bytes(OVER_TEXT + 2, "字")))),
    Case("Encode", "a 15 MB text", IA, encode_call(pb.EncodeInput(text="a" * 15_000_000))),
    Case("Encode", f"{OVER_INPUTS} texts (max_inputs_per_request + 1)", IA,
         encode_call(*[pb.EncodeInput(text="a")] * OVER_INPUTS)),
    Case("Encode", f"{DEFAULTS.max_queue + 1} texts (more than the queue holds)", IA,
         encode_call(*[pb.EncodeInput(text="a")] * (DEFAULTS.max_queue + 1))),
    Case("Encode", "invalid UTF-8 in a text", IA,
         raw("Encode", lambda w: bad_utf8(ENCODE_TEXT, "TEXT"))),
    Case("Encode", "a corrupt message (bytes that are not protobuf)", IA,
         raw("Encode", lambda w: b"\xff\xff\xff\xff")),
    # --- EncodeStream
    Case("EncodeStream", f"a request with a text of {OVER_TEXT} bytes", IA,
         encode_stream_reply(pb.EncodeRequest(inputs=[pb.EncodeInput(text="a" * OVER_TEXT)])),
         reported="the response's error_code; the stream goes on"),
    Case("EncodeStream", f"a request with {OVER_INPUTS} inputs", IA,
         encode_stream_reply(pb.EncodeRequest(inputs=[pb.EncodeInput(text="a")] * OVER_INPUTS)),
         reported="the response's error_code; the stream goes on"),
    Case("EncodeStream", "invalid UTF-8 in a text", IA,
         raw_stream("EncodeStream", bad_utf8(ENCODE_TEXT, "TEXT"))),
    # --- Search
    Case("Search", "no query", IA, rpc("Search", pb.SearchRequest(collection=GALLERY))),
    Case("Search", "a blank text", IA, search_call(text="   ")),
    Case("Search", f"a text of {OVER_TEXT} bytes", IA, search_call(text="a" * OVER_TEXT)),
    Case("Search", "a 15 MB text", IA, search_call(text="a" * 15_000_000)),
    Case("Search", "a vector of the wrong dimension", IA,
         vector_search(lambda dim: unit(dim + 1).tobytes())),
    Case("Search", "vector bytes that are not float32s (7 bytes)", IA,
         vector_search(lambda dim: b"\x00" * 7)),
    Case("Search", "a vector with NaN", IA,
         vector_search(lambda dim: np.full(dim, np.nan, "<f4").tobytes())),
    Case("Search", "the zero vector", IA,
         vector_search(lambda dim: np.zeros(dim, "<f4").tobytes())),
    Case("Search", "top_k = 5000", IA, search_call(top_k=5000)),
    Case("Search", f"offset + top_k = {MAX_RESULT_WINDOW + 1}", IA,
         search_call(top_k=10, offset=MAX_RESULT_WINDOW - 9)),
    Case("Search", "an unknown output field", IA, search_call(output_fields=["image_vector"])),
    Case("Search", "an unknown target (99)", IA, search_call(target=99)),
    Case("Search", "search param ef = 2e8", IA, search_call(search_params={"ef": 2e8})),
    Case("Search", "search param ef = 1e15", IA, search_call(search_params={"ef": 1e15})),
    Case("Search", "search param ef = 0.5", IA, search_call(search_params={"ef": 0.5})),
    Case("Search", "search param ef = NaN", IA, search_call(search_params={"ef": float("nan")})),
    Case("Search", "search param nprobe = -1", IA, search_call(search_params={"nprobe": -1})),
    Case("Search", "search param nprobe = 1e9", IA, search_call(search_params={"nprobe": 1e9})),
    Case("Search", "search param radius = 5", IA, search_call(search_params={"radius": 5})),
    Case("Search", "an unknown search param (search_k)", IA,
         search_call(search_params={"search_k": 10})),
    Case("Search", "a filter nested in 2,000 parentheses", IA, search_call(filter=nested(2000))),
    Case("Search", f"a filter nested in {MAX_FILTER_DEPTH + 1} parentheses", IA,
         search_call(filter=nested(MAX_FILTER_DEPTH + 1))),
    Case("Search", "a filter with 5,000 nots", IA, search_call(filter="not " * 5000 + 'id == "x"')),
    Case("Search", f"a filter of {len(FILTER_OVER_BYTES)} bytes", IA,
         search_call(filter=FILTER_OVER_BYTES)),
    Case("Search", f"a filter with {MAX_FILTER_BOOLEAN_OPERATORS + 1} ors", IA,
         search_call(filter=MANY_ORS)),
    Case("Search", 'a filter with an unbalanced parenthesis: `id != "") or (id == "x"`', IA,
         search_call(filter='id != "") or (id == "x"')),
    Case("Search", 'the same filter with like_id (escaping the exclusion)', IA,
         search_call(like_id="g0", filter='id != "") or (id == "g0"')),
    Case("Search", "a filter with an unclosed quote", IA, search_call(filter='id == "x')),
    Case("Search", "a filter that does not parse (`id ==`)", IA, search_call(filter="id ==")),
    Case("Search", "invalid UTF-8 in the filter", IA,
         raw("Search", lambda w: bad_utf8(pb.SearchRequest(
             collection=GALLERY, vector=pb.Vector(data=unit(w.dim).tobytes()), filter="FLT"),
             "FLT"))),
    Case("Search", "a like_id that is not stored", NF, search_call(like_id="nobody")),
    Case("Search", "a collection that does not exist", NF, search_call(collection="nothing")),
    Case("Search", "a collection name with a hyphen", IA, search_call(collection="bad-name")),
    # --- Count, Get, Delete
    Case("Count", "a filter nested in 2,000 parentheses", IA,
         rpc("Count", pb.CountRequest(collection=GALLERY, filter=nested(2000)))),
    Case("Count", "invalid UTF-8 in the collection name", IA,
         raw("Count", lambda w: bad_utf8(pb.CountRequest(collection="CNAME"), "CNAME"))),
    Case("Get", "no ids", IA, rpc("Get", pb.GetRequest(collection=GALLERY))),
    Case("Get", "an id with a control character", IA,
         rpc("Get", pb.GetRequest(collection=GALLERY, ids=["a\x00b"]))),
    Case("Get", "an id of 600 bytes", IA,
         rpc("Get", pb.GetRequest(collection=GALLERY, ids=["i" * 600]))),
    Case("Delete", "no ids", IA, rpc("Delete", pb.DeleteRequest(collection=GALLERY))),
    # --- collections
    Case("CreateCollection", "no name", IA,
         rpc("CreateCollection", pb.CreateCollectionRequest())),
    Case("CreateCollection", "a name of 300 characters", IA,
         rpc("CreateCollection", pb.CreateCollectionRequest(name="n" * 300))),
    Case("CreateCollection", "a reserved name (`x__captions`)", IA,
         rpc("CreateCollection", pb.CreateCollectionRequest(name="x__captions"))),
    Case("CreateCollection", "an existing name", Code.ALREADY_EXISTS,
         rpc("CreateCollection", pb.CreateCollectionRequest(name=GALLERY))),
    Case("DropCollection", "a name that does not exist", NF,
         rpc("DropCollection", pb.DropCollectionRequest(name="nothing"))),
    # --- Ingest: a bad item fails alone (its ack); a bad stream ends with a status
    Case("Ingest", "an item without image bytes", IA, ingest_ack(image=b""), "the item's ack"),
    Case("Ingest", "an item whose image is not an image", IA, ingest_ack(image=b"nope" * 9),
         "the item's ack"),
    Case("Ingest", "metadata nested 30,000 deep (60 KB)", IA,
         ingest_ack(metadata_json=DEEP_METADATA), "the item's ack"),
    Case("Ingest", "metadata that is not JSON", IA, ingest_ack(metadata_json="{oops"),
         "the item's ack"),
    Case("Ingest", "metadata that is a JSON array", IA, ingest_ack(metadata_json="[1]"),
         "the item's ack"),
    Case("Ingest", "metadata with NaN", IA, ingest_ack(metadata_json='{"x": NaN}'),
         "the item's ack"),
    Case("Ingest", "metadata of 70 KB", IA,
         ingest_ack(metadata_json=json.dumps({"x": "m" * 70_000})), "the item's ack"),
    Case("Ingest", "an id of 200 CJK characters (600 bytes)", IA, ingest_ack(id="字" * 200),
         "the item's ack"),
    Case("Ingest", "a caption of 9,000 bytes", IA, ingest_ack(caption="c" * 9000),
         "the item's ack"),
    Case("Ingest", "a caption with a control character", IA, ingest_ack(caption="a\x07b"),
         "the item's ack"),
    Case("Ingest", "a uri of 5,000 bytes", IA, ingest_ack(uri="u" * 5000), "the item's ack"),
    Case("Ingest", "an item before the options", IA,
         raw_stream("Ingest", pb.IngestRequest(items=[pb.IngestItem(seq=1, image=jpeg(1))]))),
    Case("Ingest", "options twice", IA, raw_stream("Ingest",
        pb.IngestRequest(options=pb.IngestOptions(collection="ingested", create_collection=True)),
        pb.IngestRequest(options=pb.IngestOptions(collection="ingested")))),
    Case("Ingest", "invalid UTF-8 in an item id", IA, raw_stream("Ingest",
        pb.IngestRequest(options=pb.IngestOptions(collection="ingested", create_collection=True)),
        bad_utf8(pb.IngestRequest(items=[pb.IngestItem(seq=1, id="IDENT", image=b"x")]), "IDENT"))),
    Case("Ingest", "a collection that does not exist (no create_collection)", NF,
         raw_stream("Ingest", pb.IngestRequest(options=pb.IngestOptions(collection="nothing")))),
]  # fmt: skip


def markdown() -> str:
    """The table of docs/RELIABILITY.md."""
    lines = [
        "| # | call | input | status code | reported in | still serving |",
        "|---|---|---|---|---|---|",
    ]
    for number, case in enumerate(CASES, start=1):
        lines.append(
            f"| {number} | {case.call} | {case.input} | {case.expected.name} "
            f"| {case.reported} | yes |"
        )
    return "\n".join(lines) + "\n"


# --- the servers -----------------------------------------------------------------------------


def milvus_lite_components() -> Components:
    """The fake encoder (fast, deterministic) in front of the real Milvus Lite store."""
    return Components(encoder=fake_components().encoder, store=MilvusStore.from_settings)


STORES = {"memory": fake_components, "milvus-lite": milvus_lite_components}


@pytest.fixture(scope="module", params=list(STORES))
def wire(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Wire]:
    tmp = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    settings = quick_settings(tmp / "bad.db", served_model())
    with (
        ThreadedServer(settings, STORES[request.param]()) as server,
        grpc.insecure_channel(
            server.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as channel,
    ):
        stub = pb_grpc.ClipSearchStub(channel)
        dim = stub.Info(pb.InfoRequest(), timeout=10).dim
        items = [
            pb.IngestRequest(options=pb.IngestOptions(collection=GALLERY, create_collection=True))
        ] + [
            pb.IngestRequest(items=[pb.IngestItem(seq=i, id=f"g{i}", image=jpeg(i))])
            for i in range(3)
        ]
        acks = acks_of(stub.Ingest(iter(items), timeout=60))
        assert [a.status for a in acks] == [pb.INGEST_STATUS_OK] * 3
        yield Wire(stub, channel, dim)


def still_serving(wire: Wire) -> None:
    """A health check says SERVING and a good search finds the stored item it looks for."""
    health = health_pb2_grpc.HealthStub(wire.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    (g1,) = wire.stub.Get(pb.GetRequest(collection=GALLERY, ids=["g1"], include_vectors=True),
                          timeout=10).items  # fmt: skip
    hits = wire.stub.Search(
        pb.SearchRequest(collection=GALLERY, vector=g1.image_vector, top_k=3), timeout=10
    ).hits
    assert [h.id for h in hits[:1]] == ["g1"] and len(hits) == 3


def test_there_are_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_its_code_and_the_server_serves_on(wire: Wire, case: Case) -> None:
    try:
        observed = case.send(wire) or Code.OK
    except grpc.RpcError as error:
        call: Any = error  # a grpc.Call
        observed, details = call.code(), call.details()
        assert "Traceback" not in details and "<class" not in details, details
    assert observed == case.expected
    still_serving(wire)


def test_the_reliability_doc_lists_every_case() -> None:
    assert markdown() in DOC.read_text(encoding="utf-8"), (
        "docs/RELIABILITY.md is stale: regenerate the table with "
        "python tests/test_bad_input.py --markdown"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python tests/test_bad_input.py --markdown")
    print(markdown(), end="")
