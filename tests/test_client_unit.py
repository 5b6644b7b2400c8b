"""Client logic without a server: conversion, errors, channel config, item sources, the ingest
state machine (driven through fake transports), profile rendering and CLI parsing."""

from __future__ import annotations

import asyncio
import csv
import gc
import inspect
import itertools
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clipsearch.client import AsyncClient, Client, convert
from clipsearch.client.channel import (
    RETRYABLE_METHODS,
    SERVICE,
    ChannelConfig,
    TlsConfig,
    call_metadata,
)
from clipsearch.client.errors import (
    AlreadyExists,
    ClipsearchError,
    Internal,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    Unknown,
    error_for,
    from_rpc_error,
)
from clipsearch.client.ingest import (
    MAX_ITEMS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    AsyncIngestStream,
    Backoff,
    IngestState,
    SyncIngestStream,
    SyncSender,
    SyncSource,
)
from clipsearch.client.profile import Profile, Sample
from clipsearch.client.sources import RowError, SourceError, open_source
from clipsearch.client.types import Hit, IngestItem, Timing
from clipsearch.v1 import clipsearch_pb2 as pb

NO_WAIT = Backoff(initial_s=0.0, maximum_s=0.0)
AIO_DETAILS = "Internal error from Core"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# --- conversion --------------------------------------------------------------------------


def test_vectors_travel_as_little_endian_float32() -> None:
    vector = np.array([1.0, -2.5, 3.25], dtype=np.float64)
    data = convert.vector_to_bytes(vector)
    assert data == np.array([1.0, -2.5, 3.25], dtype="<f4").tobytes()
    back = convert.vector_from_bytes(data)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, [1.0, -2.5, 3.25])
    back[0] = 7.0  # writable, not a view of the message's bytes


def test_vectors_from_bytes_stacks_rows() -> None:
    rows = [np.arange(4, dtype="<f4").tobytes(), np.arange(4, 8, dtype="<f4").tobytes()]
    array = convert.vectors_from_bytes(rows)
    assert array.shape == (2, 4)
    np.testing.assert_array_equal(array, np.arange(8, dtype=np.float32).reshape(2, 4))


def test_query_vector_must_be_one_dimensional() -> None:
    with pytest.raises(InvalidArgument):
        convert.vector_to_bytes(np.zeros((2, 2)))
    with pytest.raises(InvalidArgument):
        convert.vector_to_bytes([])


def test_encode_request_keeps_order_of_texts_and_images() -> None:
    request = convert.encode_request(["a", b"\x89PNG", "b"], request_id=7)
    assert [i.WhichOneof("input") for i in request.inputs] == ["text", "image", "text"]
    assert request.inputs[1].image == b"\x89PNG"
    assert request.request_id == 7
    with pytest.raises(TypeError):
        convert.encode_request([3])  # type: ignore[list-item]


def test_encode_texts_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError, match="wrap a single text"):
        convert.texts_rpc("a red circle")


def test_encode_images_reads_paths(tmp_path: Path) -> None:
    file = tmp_path / "x.jpg"
    file.write_bytes(b"jpeg bytes")
    rpc = convert.images_rpc([file, str(file), b"raw"])
    request = rpc.request
    assert isinstance(request, pb.EncodeRequest)
    assert [i.image for i in request.inputs] == [b"jpeg bytes", b"jpeg bytes", b"raw"]


def test_encode_result_parses_vectors_and_flags() -> None:
    response = pb.EncodeResponse(request_id=3)
    response.embeddings.add(vector=pb.Vector(data=np.ones(2, "<f4").tobytes()), truncated=True)
    response.embeddings.add(vector=pb.Vector(data=np.zeros(2, "<f4").tobytes()))
    response.timing.total_us = 1500
    result = convert.encode_result(response)
    np.testing.assert_array_equal(result.vectors, [[1, 1], [0, 0]])
    assert result.truncated == [True, False]
    assert result.timing.total_ms == 1.5
    assert result.error is None
    assert result.raise_for_error() is result


def test_encode_stream_error_response_becomes_a_typed_error() -> None:
    response = pb.EncodeResponse(
        request_id=1,
        error="not an image",
        error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
    )
    result = convert.encode_result(response)
    assert isinstance(result.error, InvalidArgument)
    assert result.error.message == "not an image"
    assert result.vectors.shape == (0, 0)
    with pytest.raises(InvalidArgument):
        result.raise_for_error()


def test_search_request_needs_exactly_one_query() -> None:
    with pytest.raises(InvalidArgument, match="got none"):
        convert.search_request()
    with pytest.raises(InvalidArgument, match="got text, like"):
        convert.search_request("a", like="x")


def test_search_request_fields(tmp_path: Path) -> None:
    request = convert.search_request(
        "red",
        target="both",
        top_k=5,
        offset=10,
        filter='metadata["k"] == 1',
        output_fields=("uri",),
        params={"ef": 64},
        collection="c",
    )
    assert request.WhichOneof("query") == "text"
    assert request.text == "red"
    assert request.target == pb.TARGET_BOTH
    assert (request.top_k, request.offset, request.collection) == (5, 10, "c")
    assert request.filter == 'metadata["k"] == 1'
    assert list(request.output_fields) == ["uri"]
    assert dict(request.search_params) == {"ef": 64.0}

    image = tmp_path / "q.png"
    image.write_bytes(b"png")
    assert convert.search_request(image=image).image == b"png"
    assert convert.search_request(like="id-1").like_id == "id-1"
    by_vector = convert.search_request(vector=[0.5, 0.25], target="caption")
    assert by_vector.vector.data == np.array([0.5, 0.25], "<f4").tobytes()
    assert by_vector.target == pb.TARGET_CAPTION
    with pytest.raises(InvalidArgument, match="unknown target"):
        convert.search_request("a", target="pixels")
    with pytest.raises(InvalidArgument, match="top_k"):
        convert.search_request("a", top_k=0)


def test_search_result_parses_hits_and_metadata() -> None:
    response = pb.SearchResponse(query_truncated=True)
    response.hits.add(
        id="a", score=0.5, uri="/x.jpg", caption="红色", metadata_json='{"n": 1, "tag": "红"}'
    )
    response.hits.add(id="b", score=0.25)
    result = convert.search_result(response)
    assert result.hits[0] == Hit("a", 0.5, "/x.jpg", "红色", {"n": 1, "tag": "红"})
    assert result.hits[1].metadata == {}
    assert result.query_truncated
    assert result.to_dict()["hits"][0]["metadata"] == {"n": 1, "tag": "红"}


def test_metadata_round_trip_keeps_types_and_unicode() -> None:
    metadata = {"year": 2024, "tags": ["猫", "cat"], "nested": {"ok": True}, "x": 0.5}
    raw = convert.metadata_to_json(metadata)
    assert "猫" in raw  # not \u-escaped
    assert convert.metadata_from_json(raw) == metadata
    assert convert.metadata_to_json({}) == ""
    with pytest.raises(InvalidArgument, match="JSON-serializable"):
        convert.metadata_to_json({"bad": object()})


def test_ingest_item_and_result() -> None:
    item = IngestItem(id="a", image=b"img", uri="s3://b/a", caption="c", metadata={"k": 1})
    message = convert.ingest_item(item, seq=4)
    assert message.seq == 4
    assert (message.id, message.image, message.uri) == ("a", b"img", "s3://b/a")
    assert json.loads(message.metadata_json) == {"k": 1}

    ok = convert.ingest_result(pb.IngestAck(seq=4, id="a", status=pb.INGEST_STATUS_OK))
    assert (ok.seq, ok.id, ok.status, ok.error, ok.error_code) == (4, "a", "ok", "", "")
    failed = convert.ingest_result(
        pb.IngestAck(
            seq=5,
            id="b",
            status=pb.INGEST_STATUS_FAILED,
            error="corrupt",
            error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        )
    )
    assert (failed.status, failed.error, failed.error_code) == (
        "failed",
        "corrupt",
        "INVALID_ARGUMENT",
    )
    skipped = convert.ingest_result(pb.IngestAck(seq=6, status=pb.INGEST_STATUS_SKIPPED))
    assert skipped.status == "skipped"


def test_ingest_item_needs_image_or_path() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        IngestItem(id="x")
    with pytest.raises(ValueError, match="exactly one"):
        IngestItem(id="x", image=b"a", path="a.jpg")


def test_item_from_pb_vectors_only_when_present() -> None:
    message = pb.Item(id="a", metadata_json='{"k": 2}')
    message.image_vector.data = np.ones(3, "<f4").tobytes()
    item = convert.item_from_pb(message)
    assert item.image_vector is not None
    np.testing.assert_array_equal(item.image_vector, [1, 1, 1])
    assert item.caption_vector is None
    assert item.metadata == {"k": 2}
    assert convert.item_from_pb(pb.Item(id="b")).image_vector is None


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
    ],
)
def test_rpc_errors_map_to_typed_errors(code: grpc.StatusCode, cls: type[ClipsearchError]) -> None:
    error = from_rpc_error(FakeRpcError(code, "what was wrong"))
    assert type(error) is cls
    assert error.code is code
    assert error.message == "what was wrong"
    assert str(error) == f"{code.name}: what was wrong"


def test_error_codes_from_message_integers() -> None:
    assert isinstance(error_for(5, "gone"), NotFound)
    unknown = error_for(999, "?")
    assert isinstance(unknown, Unknown)
    assert unknown.code is grpc.StatusCode.UNKNOWN
    assert error_for(14, "").retryable
    assert not error_for(3, "").retryable


# --- channel -----------------------------------------------------------------------------


def test_retry_policy_covers_idempotent_methods_only() -> None:
    options = dict(ChannelConfig().options())
    config = json.loads(options["grpc.service_config"])
    (method_config,) = config["methodConfig"]
    names = {entry["method"] for entry in method_config["name"]}
    assert names == set(RETRYABLE_METHODS)
    assert {entry["service"] for entry in method_config["name"]} == {SERVICE}
    assert not names & {"DropCollection", "Ingest", "EncodeStream"}
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert policy["maxAttempts"] == 5
    assert options["grpc.enable_retries"] == 1


def test_channel_options() -> None:
    options = dict(
        ChannelConfig(
            max_message_mb=8,
            retry=False,
            extra_options=(("grpc.keepalive_time_ms", 1234), ("grpc.primary_user_agent", "t")),
            tls=TlsConfig(server_name_override="clipsearch.test"),
        ).options()
    )
    assert options["grpc.max_send_message_length"] == 8 * 1024 * 1024
    assert options["grpc.max_receive_message_length"] == 8 * 1024 * 1024
    assert options["grpc.keepalive_time_ms"] == 1234  # the caller's option wins
    assert options["grpc.primary_user_agent"] == "t"
    assert options["grpc.enable_retries"] == 0
    assert "grpc.service_config" not in options
    assert options["grpc.ssl_target_name_override"] == "clipsearch.test"


def test_tls_config_needs_both_halves_for_mutual_tls() -> None:
    with pytest.raises(ValueError, match="both"):
        TlsConfig(certificate_chain=b"cert")
    assert isinstance(TlsConfig().credentials(), grpc.ChannelCredentials)


def test_token_metadata() -> None:
    assert call_metadata("s3cret") == (("authorization", "Bearer s3cret"),)
    assert call_metadata(None) == ()
    assert call_metadata("") == ()


# --- the two faces of one implementation ------------------------------------------------

UNARY_OPERATIONS = (
    "info",
    "wait_until_ready",
    "encode_texts",
    "encode_images",
    "search",
    "ingest_path",
    "get",
    "delete",
    "count",
    "create_collection",
    "list_collections",
    "drop_collection",
    "profile",
)


@pytest.mark.parametrize("name", UNARY_OPERATIONS)
def test_both_faces_have_each_operation_with_one_signature_and_doc(name: str) -> None:
    blocking, awaited = getattr(Client, name), getattr(AsyncClient, name)
    assert inspect.signature(blocking) == inspect.signature(awaited)
    assert blocking.__doc__ and blocking.__doc__ == awaited.__doc__
    assert inspect.iscoroutinefunction(awaited) and not inspect.iscoroutinefunction(blocking)


def test_a_face_method_signature_reads_like_a_method() -> None:
    assert str(inspect.signature(Client.count)) == (
        "(self, filter: 'str' = '', *, collection: 'str | None' = None, "
        "timeout: 'float | None' = None) -> 'int'"
    )
    assert list(inspect.signature(Client("127.0.0.1:9").search).parameters)[:2] == [
        "text",
        "image",
    ]


class ScriptedInfo:
    """The Info method of a fake stub: raises the scripted errors in turn, then answers."""

    def __init__(self, errors: list[grpc.StatusCode], awaited: bool = False) -> None:
        self.errors = errors
        self.awaited = awaited
        self.calls: list[tuple[float | None, Any]] = []

    def __call__(self, request: pb.InfoRequest, timeout: float | None, metadata: Any) -> Any:
        assert isinstance(request, pb.InfoRequest)
        self.calls.append((timeout, metadata))
        code = self.errors.pop(0) if self.errors else None

        def answer() -> pb.InfoResponse:
            if code is not None:
                raise FakeRpcError(code, f"scripted {code.name}")
            return pb.InfoResponse(model_name="m", dim=8)

        if not self.awaited:
            return answer()

        async def later() -> pb.InfoResponse:
            return answer()

        return later()


class FakeStub:
    def __init__(self, info: ScriptedInfo) -> None:
        self.Info = info


def _client_with(info: ScriptedInfo, **options: Any) -> Client:
    client = Client("127.0.0.1:9", **options)
    client._stub = FakeStub(info)  # type: ignore[assignment]
    return client


def test_a_unary_call_gets_its_deadline_token_and_typed_error() -> None:
    info = ScriptedInfo([grpc.StatusCode.NOT_FOUND])
    client = _client_with(info, timeout=7.0, token="t")
    with pytest.raises(NotFound, match="scripted NOT_FOUND"):
        client.info()
    assert client.info(timeout=2.0).model_name == "m"
    token = (("authorization", "Bearer t"),)
    assert info.calls == [(7.0, token), (2.0, token)]
    client.close()


def test_wait_until_ready_retries_through_the_plan_until_the_server_answers() -> None:
    info = ScriptedInfo([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])
    client = _client_with(info)
    assert client.wait_until_ready(timeout=5.0).dim == 8
    assert len(info.calls) == 3
    info.errors = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(InvalidArgument):
        client.wait_until_ready(timeout=5.0)  # not a "not ready yet": raised at once
    assert len(info.calls) == 4
    client.close()


async def test_the_async_face_runs_the_same_plans() -> None:
    info = ScriptedInfo([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND], awaited=True)
    async with AsyncClient("127.0.0.1:9", timeout=3.0) as client:
        client._stub = FakeStub(info)  # type: ignore[assignment]
        with pytest.raises(NotFound):
            await client.wait_until_ready(timeout=5.0)
        assert (await client.info()).model_name == "m"
    assert [timeout for timeout, _ in info.calls][1:] == [pytest.approx(5.0, abs=0.5), 3.0]


# --- item sources ------------------------------------------------------------------------


def test_directory_source(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("z.jpg", "a.PNG", "b/c/d.webp", "b/notes.txt", ".hidden/x.jpg", "b/.y.jpg"):
        (tmp_path / name).write_bytes(b"x")
    source = open_source(tmp_path)
    items = list(source)
    assert [i.id for i in items] == ["a.PNG", "b/c/d.webp", "z.jpg"]
    assert source.total == 3
    assert items[1].uri == (tmp_path / "b/c/d.webp").resolve().as_posix()
    assert Path(str(items[1].path)) == (tmp_path / "b/c/d.webp").resolve()
    assert items[0].read_image() == b"x"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_source_with_caption_field_and_metadata(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _write_csv(
        tmp_path / "manifest.csv",
        [
            {
                "id": "demo-1",
                "path": "images/1.jpg",
                "caption_en": "a red circle",
                "caption_zh": "红色的圆形",
                "n_objects": "1",
                "width": "64",
                "ratio": "0.5",
                "code": "007",
                "shape2": "",
            },
            {
                "id": "",
                "path": str(tmp_path / "images/2.jpg"),
                "caption_en": "a blue square",
                "caption_zh": "蓝色的正方形",
                "n_objects": "2",
                "width": "64",
                "ratio": "1.25",
                "code": "x",
                "shape2": "star",
            },
        ],
    )
    source = open_source(tmp_path / "manifest.csv", caption_field="caption_en")
    first, second = list(source)
    assert source.total == 2
    assert first.id == "demo-1"
    assert first.caption == "a red circle"
    assert first.path == (tmp_path / "images/1.jpg").resolve()
    assert first.uri == (tmp_path / "images/1.jpg").resolve().as_posix()
    assert first.metadata == {
        "caption_zh": "红色的圆形",
        "n_objects": 1,
        "width": 64,
        "ratio": 0.5,
        "code": "007",
        "shape2": "",
    }
    assert second.id == ""  # the server will use the content hash
    assert second.metadata["ratio"] == 1.25


def test_csv_source_errors(tmp_path: Path) -> None:
    _write_csv(tmp_path / "m.csv", [{"id": "a", "caption": "x"}])
    with pytest.raises(SourceError, match="no column 'caption_en'"):
        list(open_source(tmp_path / "m.csv", caption_field="caption_en"))
    with pytest.raises(SourceError, match=r"m\.csv:2: the row has neither a path nor a uri"):
        list(open_source(tmp_path / "m.csv"))
    _write_csv(tmp_path / "r.csv", [{"id": "a", "uri": "https://example.com/a.jpg"}])
    with pytest.raises(SourceError, match="remote URI"):
        list(open_source(tmp_path / "r.csv"))


def test_jsonl_source_keeps_json_types(tmp_path: Path) -> None:
    file_uri = (tmp_path / "pics" / "b.png").as_uri()
    lines = [
        {"id": "a", "path": "pics/a.jpg", "caption": "cat", "year": 2020, "tags": ["x"]},
        {"uri": file_uri, "metadata": {"k": 1}, "score": 0.5},
        {},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:2]) + "\n\n"
    (tmp_path / "m.jsonl").write_text(text, encoding="utf-8")
    source = open_source(tmp_path / "m.jsonl")
    a, b = list(source)
    assert source.total == 2
    assert (a.id, a.caption, a.metadata) == ("a", "cat", {"year": 2020, "tags": ["x"]})
    assert a.path == (tmp_path / "pics/a.jpg").resolve()
    assert b.path == (tmp_path / "pics/b.png").resolve()
    assert b.uri == file_uri  # a given uri is stored as given
    assert b.metadata == {"k": 1, "score": 0.5}
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "path": "x.jpg"}\n[1]\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: each line must be a JSON object"):
        list(open_source(tmp_path / "bad.jsonl"))


def test_a_bad_manifest_row_raises_for_itself_and_the_rows_after_it_still_come(
    tmp_path: Path,
) -> None:
    lines = [
        b'{"id": "a", "path": "a.jpg"}',
        b"{not json",
        b"\xff\xfe",
        b"[1]",
        b'{"id": "b", "uri": "https://example.com/b.jpg"}',
        b'{"id": "c", "path": "c.jpg"}',
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    csv_rows = [{"id": "d", "path": "d.jpg"}, {"id": "e"}, {"id": "f", "path": "f.jpg"}]
    _write_csv(tmp_path / "m.csv", csv_rows)
    for name, expected_ids, expected_errors in [
        ("m.jsonl", ["a", "c"], [
            ("m.jsonl:2", "not valid JSON: Expecting property name enclosed in double quotes "
             "at column 2"),
            ("m.jsonl:3", "not UTF-8 text: 'utf-8' codec can't decode byte 0xff in position 0: "
             "invalid start byte"),
            ("m.jsonl:4", "each line must be a JSON object"),
            ("m.jsonl:5", "'https://example.com/b.jpg' is a remote URI; the client reads local "
             "files only (give a path column, or download the images first)"),
        ]),
        ("m.csv", ["d", "f"], [("m.csv:3", "the row has neither a path nor a uri")]),
    ]:  # fmt: skip
        source = open_source(tmp_path / name)
        rows = iter(source)
        ids, errors = [], []
        while True:
            try:
                ids.append(next(rows).id)
            except RowError as exc:
                errors.append((Path(exc.where).name, exc.reason))
            except StopIteration:
                break
        assert (ids, errors) == (expected_ids, expected_errors)
        assert source.total == len(expected_ids) + len(expected_errors)


def test_open_source_rejects_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="not a directory, a CSV"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(SourceError, match="caption-field"):
        open_source(tmp_path, caption_field="caption_en")


# --- the ingest state machine, through fake transports --------------------------------------

END = object()


class FakeIngestServer:
    """Acks every item OK (id echoed), one stream per `open_*` call.

    Acks wait until the window is full (or the requests ended), so flow control is exercised
    deterministically; `break_after[attempt]` acks into an attempt the stream fails with
    `break_code`. Records every received seq per attempt, the items of each message and the
    largest number in flight. Each ack comes in a response of its own.
    """

    def __init__(
        self,
        break_after: dict[int, int] | None = None,
        break_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        window: int = 4,
        details: str = "connection reset",
    ) -> None:
        self.break_after = break_after or {}
        self.break_code = break_code
        self.details = details
        self.window = window
        self.received: list[list[int]] = []
        self.acked: list[list[int]] = []
        self.options: list[pb.IngestOptions] = []
        self.message_sizes: list[int] = []
        self.max_in_flight = 0
        self._lock = threading.Condition()

    def _ack(self, attempt: int, item: pb.IngestItem) -> pb.IngestResponse:
        self.acked[attempt].append(item.seq)
        return pb.IngestResponse(
            acks=[pb.IngestAck(seq=item.seq, id=item.id, status=pb.INGEST_STATUS_OK)]
        )

    def _received(self, attempt: int, request: pb.IngestRequest) -> list[Any]:
        """What the acking side takes from a request: the options, or each of its items."""
        if request.HasField("options"):
            return [request]
        self.message_sizes.append(len(request.items))
        for item in request.items:
            self.received[attempt].append(item.seq)
        return list(request.items)

    def _should_break(self, attempt: int, acked: int) -> bool:
        return self.break_after.get(attempt) == acked

    def open_sync(self, requests: Iterator[pb.IngestRequest]) -> Iterator[pb.IngestResponse]:
        attempt = len(self.received)
        self.received.append([])
        self.acked.append([])
        inbox: queue.Queue[Any] = queue.Queue()
        state = {"in_flight": 0, "ended": False}

        def pump() -> None:
            for request in requests:
                with self._lock:
                    taken = self._received(attempt, request)
                    if not request.HasField("options"):
                        state["in_flight"] += len(taken)
                        self.max_in_flight = max(self.max_in_flight, state["in_flight"])
                    self._lock.notify_all()
                for one in taken:
                    inbox.put(one)
            with self._lock:
                state["ended"] = True
                self._lock.notify_all()
            inbox.put(END)

        threading.Thread(target=pump, daemon=True).start()

        def acks() -> Iterator[pb.IngestResponse]:
            first = inbox.get(timeout=5)
            self.options.append(first.options)
            acked = 0
            while True:
                with self._lock:
                    self._lock.wait_for(
                        lambda: state["in_flight"] >= self.window or state["ended"], timeout=5
                    )
                request = inbox.get(timeout=5)
                if request is END:
                    return
                if self._should_break(attempt, acked):
                    raise FakeRpcError(self.break_code, self.details)
                with self._lock:
                    state["in_flight"] -= 1
                acked += 1
                yield self._ack(attempt, request)

        return acks()

    def open_async(
        self, requests: AsyncIterator[pb.IngestRequest]
    ) -> AsyncIterator[pb.IngestResponse]:
        attempt = len(self.received)
        self.received.append([])
        self.acked.append([])

        async def acks() -> AsyncIterator[pb.IngestResponse]:
            inbox: asyncio.Queue[Any] = asyncio.Queue()
            changed = asyncio.Event()
            state = {"in_flight": 0, "ended": False}

            async def pump() -> None:
                async for request in requests:
                    taken = self._received(attempt, request)
                    if not request.HasField("options"):
                        state["in_flight"] += len(taken)
                        self.max_in_flight = max(self.max_in_flight, state["in_flight"])
                    for one in taken:
                        await inbox.put(one)
                    changed.set()
                state["ended"] = True
                await inbox.put(END)
                changed.set()

            task = asyncio.create_task(pump())
            try:
                first = await inbox.get()
                self.options.append(first.options)
                acked = 0
                while True:
                    while not (state["in_flight"] >= self.window or state["ended"]):
                        changed.clear()
                        await asyncio.wait_for(changed.wait(), 5)
                    request = await inbox.get()
                    if request is END:
                        return
                    if self._should_break(attempt, acked):
                        raise FakeRpcError(self.break_code, self.details)
                    state["in_flight"] -= 1
                    acked += 1
                    yield self._ack(attempt, request)
            finally:
                task.cancel()

        return acks()


def _items(n: int) -> list[IngestItem]:
    return [IngestItem(id=f"i{k}", image=f"img{k}".encode()) for k in range(n)]


def _state(window: int = 4, max_attempts: int = 5) -> IngestState:
    options = convert.ingest_options("c", create_collection=True, skip_existing=True)
    return IngestState(options, window=window, max_attempts=max_attempts, backoff=NO_WAIT)


def test_ingest_sends_options_first_and_acks_every_item() -> None:
    server = FakeIngestServer(window=4)
    stream = SyncIngestStream(_state(window=4), _items(10), server.open_sync)
    results = list(stream)
    assert sorted(r.seq for r in results) == list(range(10))
    assert {r.id for r in results} == {f"i{k}" for k in range(10)}
    assert server.options[0] == pb.IngestOptions(
        collection="c", create_collection=True, skip_existing=True
    )
    assert stream.summary.ok == 10
    assert stream.reconnects == 0


def test_ingest_window_bounds_items_in_flight() -> None:
    server = FakeIngestServer(window=3)
    list(SyncIngestStream(_state(window=3), _items(20), server.open_sync))
    assert server.max_in_flight == 3  # reached (acks wait for a full window), never exceeded


def test_ready_items_travel_together_up_to_the_message_limit() -> None:
    server = FakeIngestServer(window=200)
    results = list(SyncIngestStream(_state(window=200), _items(150), server.open_sync))
    assert sorted(r.seq for r in results) == list(range(150))
    assert server.message_sizes == [64, 64, 22]  # a list's items are all ready at once


async def test_the_async_driver_sends_ready_items_together_too() -> None:
    server = FakeIngestServer(window=100)
    summary = await AsyncIngestStream(_state(window=100), _items(70), server.open_async).run()
    assert summary.ok == 70
    assert server.message_sizes == [64, 6]


def test_a_generator_source_is_read_ahead_and_batched() -> None:
    server = FakeIngestServer(window=300)
    results = list(SyncIngestStream(_state(window=300), iter(_items(300)), server.open_sync))
    assert sorted(r.seq for r in results) == list(range(300))
    assert sum(server.message_sizes) == 300
    assert max(server.message_sizes) <= MAX_ITEMS_PER_MESSAGE


def test_a_message_stays_under_the_byte_limit_unless_one_item_is_larger() -> None:
    big = MAX_MESSAGE_BYTES // 3
    items = [IngestItem(id=f"b{k}", image=bytes(big)) for k in range(5)]
    items.append(IngestItem(id="huge", image=bytes(MAX_MESSAGE_BYTES + 1)))
    server = FakeIngestServer(window=10)
    list(SyncIngestStream(_state(window=10), items, server.open_sync))
    assert server.message_sizes == [2, 2, 1, 1]  # 3 thirds plus framing would pass the limit


def test_a_slow_source_does_not_hold_back_items_already_read() -> None:
    """Each item is sent as soon as it is read: the message in hand is not kept open waiting
    for the source's next item."""
    server = FakeIngestServer(window=1)  # acks each item as soon as it arrives
    release = threading.Event()

    def source() -> Iterator[IngestItem]:
        yield IngestItem(id="first", image=b"1")
        release.wait(10)  # the source stalls until the first item has been acknowledged
        yield IngestItem(id="second", image=b"2")

    stream = SyncIngestStream(_state(window=4), source(), server.open_sync)
    first = next(stream)  # never comes if "first" waits in a message for "second"
    release.set()
    rest = list(stream)
    assert [first.id] + [r.id for r in rest] == ["first", "second"]
    assert server.message_sizes == [1, 1]


def test_ingest_resumes_after_a_broken_stream_without_losing_or_repeating() -> None:
    server = FakeIngestServer(break_after={0: 5}, window=4)
    stream = SyncIngestStream(_state(window=4), _items(12), server.open_sync)
    results = list(stream)
    seqs = [r.seq for r in results]
    assert sorted(seqs) == list(range(12))  # each item reported exactly once
    assert stream.reconnects == 1
    unacked_in_first = [s for s in server.received[0] if s not in server.acked[0]]
    # The second stream starts with what the first left unacknowledged, in order.
    assert server.received[1][: len(unacked_in_first)] == unacked_in_first
    assert set(server.acked[0]) | set(server.acked[1]) == set(range(12))
    assert server.options[1] == server.options[0]


def test_ingest_gives_up_after_max_attempts_without_progress() -> None:
    server = FakeIngestServer(break_after={0: 0, 1: 0, 2: 0}, window=2)
    stream = SyncIngestStream(_state(window=2, max_attempts=3), _items(5), server.open_sync)
    with pytest.raises(Unavailable, match="gave up after 3 attempts"):
        list(stream)
    assert len(server.received) == 3


def test_progress_resets_the_attempt_count() -> None:
    # Three breaks, each after some acks: more breaks than max_attempts, but never two in a
    # row without progress, so the ingest completes.
    server = FakeIngestServer(break_after={0: 2, 1: 2, 2: 2}, window=2)
    stream = SyncIngestStream(_state(window=2, max_attempts=2), _items(10), server.open_sync)
    assert sorted(r.seq for r in stream) == list(range(10))
    assert stream.reconnects == 3


def test_ingest_does_not_resume_on_errors_that_are_not_transient() -> None:
    server = FakeIngestServer(break_after={0: 0}, break_code=grpc.StatusCode.NOT_FOUND, window=2)
    with pytest.raises(NotFound):
        list(SyncIngestStream(_state(window=2), _items(3), server.open_sync))
    assert len(server.received) == 1


def test_the_aio_write_after_close_artifact_is_resumable() -> None:
    # grpc.aio reports a stream the server ended during a write as this INTERNAL error.
    server = FakeIngestServer(
        break_after={0: 1}, break_code=grpc.StatusCode.INTERNAL, window=2, details=AIO_DETAILS
    )
    stream = SyncIngestStream(_state(window=2), _items(4), server.open_sync)
    assert sorted(r.seq for r in stream) == [0, 1, 2, 3]
    assert stream.reconnects == 1
    other = FakeIngestServer(break_after={0: 1}, break_code=grpc.StatusCode.INTERNAL, window=2)
    with pytest.raises(Internal, match="connection reset"):
        list(SyncIngestStream(_state(window=2), _items(4), other.open_sync))


def test_unreadable_files_fail_locally_and_are_never_sent(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(b"jpeg")
    items = [
        IngestItem(id="good", path=good),
        IngestItem(id="gone", path=tmp_path / "missing.jpg"),
        IngestItem(id="bytes", image=b"x"),
    ]
    server = FakeIngestServer(window=2)
    stream = SyncIngestStream(_state(window=2), items, server.open_sync)
    results = {r.id: r for r in stream}
    assert results["good"].ok and results["bytes"].ok
    assert results["gone"].status == "failed"
    assert "cannot read" in results["gone"].error
    assert results["gone"].error_code == "INVALID_ARGUMENT"
    assert 1 not in server.received[0]
    assert stream.summary.errors == [("gone", results["gone"].error)]


def test_source_errors_surface_after_sent_items_are_acknowledged() -> None:
    def source() -> Iterator[IngestItem]:
        yield from _items(3)
        raise RuntimeError("manifest line 4 is broken")

    stream = SyncIngestStream(_state(window=2), source(), FakeIngestServer(window=2).open_sync)
    seen = []
    with pytest.raises(RuntimeError, match="line 4"):
        for result in stream:
            seen.append(result.seq)
    assert sorted(seen) == [0, 1, 2]


def _manifest_with_a_bad_line(folder: Path) -> Path:
    for name in ("a.jpg", "c.jpg"):
        (folder / name).write_bytes(b"jpeg")
    manifest = folder / "m.jsonl"
    manifest.write_text(
        '{"id": "a", "path": "a.jpg"}\n{"id": "b", "path": \n{"id": "c", "path": "c.jpg"}\n',
        encoding="utf-8",
    )
    return manifest


def test_a_bad_manifest_row_is_a_failed_item_and_the_ingest_goes_on(tmp_path: Path) -> None:
    server = FakeIngestServer(window=2)
    source = open_source(_manifest_with_a_bad_line(tmp_path))
    stream = SyncIngestStream(_state(window=2), source, server.open_sync)
    results = {r.id: r for r in stream}
    where = f"{tmp_path / 'm.jsonl'}:2"
    assert sorted(results) == sorted(["a", "c", where])
    assert (results[where].status, results[where].error_code) == ("failed", "INVALID_ARGUMENT")
    assert results[where].error.startswith("not valid JSON: ")
    assert (stream.summary.ok, stream.summary.failed) == (2, 1)
    assert stream.summary.errors == [(where, results[where].error)]
    assert len(server.received[0]) == 2  # the bad row is never sent


async def test_async_ingest_reports_a_bad_manifest_row_and_goes_on(tmp_path: Path) -> None:
    server = FakeIngestServer(window=2)
    source = open_source(_manifest_with_a_bad_line(tmp_path))
    summary = await AsyncIngestStream(_state(window=2), source, server.open_async).run()
    assert (summary.ok, summary.failed, summary.skipped) == (2, 1, 0)
    assert summary.errors[0][0] == f"{tmp_path / 'm.jsonl'}:2"


async def test_async_ingest_resumes_after_a_broken_stream() -> None:
    async def source() -> AsyncIterator[IngestItem]:
        for item in _items(15):
            await asyncio.sleep(0)
            yield item

    server = FakeIngestServer(break_after={0: 4}, window=3)
    stream = AsyncIngestStream(_state(window=3), source(), server.open_async)
    seqs = [result.seq async for result in stream]
    assert sorted(seqs) == list(range(15))
    assert stream.reconnects == 1
    assert server.max_in_flight == 3
    unacked_in_first = [s for s in server.received[0] if s not in server.acked[0]]
    assert server.received[1][: len(unacked_in_first)] == unacked_in_first


async def test_async_ingest_accepts_sync_iterables() -> None:
    server = FakeIngestServer(window=2)
    summary = await AsyncIngestStream(_state(window=2), _items(5), server.open_async).run()
    assert (summary.ok, summary.failed, summary.skipped) == (5, 0, 0)


def _source_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "clipsearch-ingest-source"]


def _no_source_thread_within(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _source_threads():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _endless() -> Iterator[IngestItem]:
    for k in itertools.count():
        yield IngestItem(id=f"e{k}", image=b"e")


def test_an_empty_generator_source_ends_at_once_with_nothing() -> None:
    server = FakeIngestServer(window=2)
    stream = SyncIngestStream(_state(window=2), iter(()), server.open_sync)
    assert list(stream) == []
    assert (stream.summary.ok, stream.summary.failed, stream.reconnects) == (0, 0, 0)
    assert server.received == [[]]
    assert _no_source_thread_within(5)


async def test_an_empty_async_source_ends_at_once_with_nothing() -> None:
    async def nothing() -> AsyncIterator[IngestItem]:
        return
        yield

    server = FakeIngestServer(window=2)
    summary = await AsyncIngestStream(_state(window=2), nothing(), server.open_async).run()
    assert (summary.ok, summary.failed, summary.reconnects) == (0, 0, 0)
    assert server.received == [[]]


def test_closing_the_stream_stops_reading_the_source() -> None:
    server = FakeIngestServer(window=2)
    stream = SyncIngestStream(_state(window=2), _endless(), server.open_sync)
    assert [next(stream).ok for _ in range(3)] == [True] * 3
    assert len(_source_threads()) == 1
    stream.close()
    assert _no_source_thread_within(5)
    with pytest.raises(StopIteration):
        next(stream)


def test_breaking_out_of_the_loop_and_dropping_the_stream_stops_reading_the_source() -> None:
    server = FakeIngestServer(window=2)
    for taken, _ in enumerate(SyncIngestStream(_state(window=2), _endless(), server.open_sync)):
        if taken == 2:
            break
    gc.collect()
    assert _no_source_thread_within(5)


def test_a_slow_source_gets_each_item_acked_before_the_next_is_read() -> None:
    server = FakeIngestServer(window=1)
    acked = [threading.Event() for _ in range(5)]

    def source() -> Iterator[IngestItem]:
        for k in range(5):
            if k:
                assert acked[k - 1].wait(10), f"item {k - 1} was not acked while the source waited"
            yield IngestItem(id=f"s{k}", image=b"s")

    stream = SyncIngestStream(_state(window=4), source(), server.open_sync)
    for result in stream:
        acked[result.seq].set()
    assert stream.summary.ok == 5 and server.message_sizes == [1] * 5


async def test_cancelling_an_async_ingest_leaves_no_task_behind() -> None:
    async def endless() -> AsyncIterator[IngestItem]:
        for k in itertools.count():
            await asyncio.sleep(0)
            yield IngestItem(id=f"a{k}", image=b"a")

    async def ack_each(requests: AsyncIterator[pb.IngestRequest]) -> Any:
        # Not FakeIngestServer: its asyncio.wait_for may swallow a cancel on Python 3.11.
        async for request in requests:
            if request.items:
                yield pb.IngestResponse(acks=[pb.IngestAck(seq=i.seq) for i in request.items])

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    stream = AsyncIngestStream(_state(window=2), endless(), ack_each)
    seen = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stream.aclose()
    others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=5)
    assert [t for t in others if not t.done()] == []
    gc.collect()
    assert errors == []


def test_an_item_an_ended_attempt_took_is_sent_by_the_current_one_without_waiting() -> None:
    """The old attempt's request thread may take an item from the source after its stream
    broke; the new attempt, already waiting on a slow source, must send it at once."""
    state = _state(window=4)
    stalled = threading.Event()

    def slow() -> Iterator[IngestItem]:
        stalled.wait(10)
        yield IngestItem(id="late", image=b"l")

    source = SyncSource(slow(), state)
    sender = SyncSender(state, source)
    old = state.begin_attempt()
    state.end_attempt(old)
    current = state.begin_attempt()
    got: queue.Queue[Any] = queue.Queue()
    waiting = threading.Thread(
        target=lambda: got.put(sender.next(current, threading.Semaphore(4), wait=True))
    )
    waiting.start()
    try:
        taken = IngestItem(id="taken", image=b"t")
        assert state.register(old, taken) is None  # what the old attempt does with its item
        assert got.get(timeout=2) == (0, taken)
    finally:
        stalled.set()
        source.close()
        waiting.join(5)


class FakeIngestStub:
    def __init__(self, server: FakeIngestServer, awaited: bool) -> None:
        self.server = server
        self.awaited = awaited
        self.timeouts: list[float | None] = []

    def Ingest(self, requests: Any, timeout: float | None, metadata: Any) -> Any:
        self.timeouts.append(timeout)
        if self.awaited:
            return self.server.open_async(requests)
        return self.server.open_sync(requests)


def _gallery(root: Path) -> Path:
    for name in ("a.jpg", "b.png", "c.webp"):
        (root / name).write_bytes(name.encode())
    return root


def test_ingest_path_runs_the_whole_ingest_in_the_plan(tmp_path: Path) -> None:
    server = FakeIngestServer(break_after={0: 1}, window=2)
    with Client("127.0.0.1:9") as client:
        client._stub = FakeIngestStub(server, awaited=False)  # type: ignore[assignment]
        summary = client.ingest_path(
            _gallery(tmp_path), collection="c", progress=False, max_attempts=3
        )
    assert (summary.ok, summary.failed, summary.reconnects) == (3, 0, 1)
    assert server.options[0].collection == "c"
    assert sorted(seq for acked in server.acked for seq in acked) == [0, 1, 2]


async def test_async_ingest_path_runs_the_same_plan(tmp_path: Path) -> None:
    server = FakeIngestServer(window=2)
    async with AsyncClient("127.0.0.1:9") as client:
        client._stub = FakeIngestStub(server, awaited=True)  # type: ignore[assignment]
        summary = await client.ingest_path(_gallery(tmp_path), progress=True)
    assert (summary.ok, summary.failed, summary.skipped) == (3, 0, 0)
    assert server.received == [[0, 1, 2]]


def test_backoff_grows_exponentially_up_to_its_maximum() -> None:
    backoff = Backoff(initial_s=0.1, maximum_s=1.0, multiplier=2.0, jitter=0.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    jittered = Backoff(initial_s=1.0, jitter=0.2)
    assert all(0.8 <= jittered.delay(1) <= 1.2 for _ in range(50))


# --- profile -----------------------------------------------------------------------------


def _sample(round_trip_us: int, total_us: int, **stages: int) -> Sample:
    return Sample(round_trip_us, Timing(total_us=total_us, batch_size=1, **stages))


def test_profile_figures_are_medians_and_never_negative() -> None:
    profile = Profile(
        "Search text 'x'",
        (
            _sample(10_000, 8_000, queue_us=1000, inference_us=3000, search_us=2000),
            _sample(12_000, 9_000, queue_us=1000, inference_us=4000, search_us=2000),
            _sample(30_000, 20_000, queue_us=9000, inference_us=9000, search_us=9000),
        ),
    )
    assert profile.round_trip_us == 12_000
    assert profile.server_us == 9_000
    assert profile.network_us == 3_000
    assert profile.stage_us("inference") == 4_000
    assert profile.unaccounted_us == 9_000 - (1000 + 0 + 4000 + 2000)
    over = Profile("x", (_sample(1000, 2000, inference_us=3000),))
    assert over.network_us == 0.0
    assert over.unaccounted_us == 0.0


def test_profile_render_is_a_tree() -> None:
    profile = Profile(
        "Search text 'a red circle' -> image, top_k=10",
        (_sample(10_000, 8_000, queue_us=500, preprocess_us=1500, inference_us=4000),),
    )
    lines = profile.render().splitlines()
    assert lines[0] == "Search text 'a red circle' -> image, top_k=10"
    assert lines[1].startswith("round trip") and lines[1].endswith("10.00 ms   100%")
    assert lines[2].startswith("├── network + client") and lines[2].endswith("2.00 ms    20%")
    assert lines[3].startswith("└── server total") and lines[3].endswith("8.00 ms    80%")
    labels = [line.split()[1] for line in lines[4:9]]
    assert labels == ["queue", "preprocess", "inference", "search", "unaccounted"]
    assert lines[6].endswith("4.00 ms    40%")
    assert lines[8].startswith("    └── unaccounted") and lines[8].endswith("2.00 ms    20%")
    assert lines[9] == "1 call; batch size 1"
    assert str(profile) == profile.render()


def test_the_client_imports_only_its_light_dependencies() -> None:
    code = (
        "import sys\n"
        "import clipsearch.client as c, clipsearch.client.commands\n"
        "c.Client, c.AsyncClient, c.IngestItem, c.open_source\n"
        "heavy = ('clipsearch.server', 'clipsearch.export', 'PIL', 'torch', 'pymilvus',\n"
        "         'onnxruntime', 'tokenizers', 'transformers')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or\n"
        "             any(m.startswith(h + '.') or m == h for h in heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
