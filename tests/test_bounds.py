"""Regression tests of issue 9's defects 2, 5, 6 and 7, each against a real server on port 0:
the fakes (FakeBackend, InMemoryStore) where the store does not matter, Milvus Lite (behind
the fake encoder) where it does.

2: a long text is refused past `max_text_bytes`, and one at the cap does not hold up other
   calls (tokenization runs off the event loop).
5: search params and filters are bounded, and a hostile filter costs one log line.
6: undecodable requests and oversized Encodes are INVALID_ARGUMENT, not UNKNOWN or a
   retryable RESOURCE_EXHAUSTED.
7: a filter cannot undo the exclusion of the "more like this" item.
"""

from __future__ import annotations

import logging
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from image_fixtures import encode, pattern
from server_fixtures import ThreadedServer, acks_of, quick_settings, served_model

from clipsearch.server.app import Components, fake_components
from clipsearch.server.errors import ConfigurationError, InvalidFilter, InvalidInput
from clipsearch.server.settings import Settings
from clipsearch.server.store import MilvusStore
from clipsearch.server.store.expressions import check_filter
from clipsearch.server.store.indexing import IndexConfig, check_search_params
from clipsearch.server.store.validation import check_text_bytes
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

# The defaults of max_text_bytes and max_inputs_per_request (spelled out, so these tests
# run unchanged against code that predates the settings).
TEXT_CAP = 16384
INPUTS_CAP = 1024
QUEUE = 4096
IDS = ["x0", "x1", "x2", "x3", "x4", "x5"]


def jpeg(seed: int) -> bytes:
    return encode(pattern((64 + seed, 48), seed=seed), "JPEG", quality=90)


def milvus_lite_components() -> Components:
    return Components(encoder=fake_components().encoder, store=MilvusStore.from_settings)


STORES: dict[str, Callable[[], Components]] = {
    "memory": fake_components,
    "milvus-lite": milvus_lite_components,
}


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details()


@pytest.fixture(scope="module", params=list(STORES))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedServer]:
    tmp = tmp_path_factory.mktemp(f"bounds-{request.param}")
    settings = quick_settings(tmp / "bounds.db", served_model())
    with ThreadedServer(settings, STORES[request.param]()) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ThreadedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ClipSearchStub:
    stub = pb_grpc.ClipSearchStub(channel)
    requests = [pb.IngestRequest(options=pb.IngestOptions(collection="c", create_collection=True))]
    requests += [
        pb.IngestRequest(items=[pb.IngestItem(seq=i, id=item_id, image=jpeg(i))])
        for i, item_id in enumerate(IDS)
    ]
    acks = acks_of(stub.Ingest(iter(requests), timeout=60))
    assert [a.status for a in acks] == [pb.INGEST_STATUS_OK] * len(IDS)
    return stub


def vector_of(stub: pb_grpc.ClipSearchStub, item_id: str) -> pb.Vector:
    request = pb.GetRequest(collection="c", ids=[item_id], include_vectors=True)
    (item,) = stub.Get(request, timeout=10).items
    return item.image_vector


# --- defect 2: one long text freezes the server ------------------------------------------


def test_a_text_past_the_cap_is_refused_by_every_call_that_takes_text(
    stub: pb_grpc.ClipSearchStub,
) -> None:
    over = "a" * (TEXT_CAP + 1)
    code, message = code_of(
        lambda: stub.Encode(
            pb.EncodeRequest(inputs=[pb.EncodeInput(text="ok"), pb.EncodeInput(text=over)]),
            timeout=10,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"input 1 is {TEXT_CAP + 1} bytes, at most {TEXT_CAP}" in message
    assert "max_text_bytes" in message
    code, message = code_of(lambda: stub.Search(pb.SearchRequest(collection="c", text=over)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_text_bytes" in message
    (reply,) = stub.EncodeStream(
        iter([pb.EncodeRequest(inputs=[pb.EncodeInput(text=over)], request_id=4)]), timeout=10
    )
    assert reply.request_id == 4 and "max_text_bytes" in reply.error
    assert reply.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # at the cap, in bytes (3-byte characters), is accepted
    at_cap = "字" * (TEXT_CAP // 3)
    assert len(stub.Encode(pb.EncodeRequest(inputs=[pb.EncodeInput(text=at_cap)])).embeddings) == 1


def test_a_caption_past_the_text_cap_fails_its_item_alone(tmp_path: Path) -> None:
    settings = quick_settings(tmp_path / "unused.db", served_model(), max_text_bytes=1000)
    with (
        ThreadedServer(settings, fake_components()) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        stub = pb_grpc.ClipSearchStub(channel)
        requests = [
            pb.IngestRequest(options=pb.IngestOptions(collection="c", create_collection=True)),
            pb.IngestRequest(
                items=[pb.IngestItem(seq=1, id="no", image=jpeg(1), caption="c" * 1001)]
            ),
            pb.IngestRequest(
                items=[pb.IngestItem(seq=2, id="ok", image=jpeg(2), caption="c" * 1000)]
            ),
        ]
        acks = {a.seq: a for a in acks_of(stub.Ingest(iter(requests), timeout=30))}
        assert acks[1].status == pb.INGEST_STATUS_FAILED
        assert acks[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "max_text_bytes" in acks[1].error
        assert acks[2].status == pb.INGEST_STATUS_OK


def _latencies_while(
    stub: pb_grpc.ClipSearchStub, query: pb.Vector, busy: threading.Thread
) -> list[float]:
    latencies = []
    request = pb.SearchRequest(collection="c", vector=query, top_k=3)
    while busy.is_alive():
        started = time.perf_counter()
        stub.Search(request, timeout=30)
        latencies.append(time.perf_counter() - started)
    return latencies


def test_texts_at_the_cap_do_not_hold_up_a_concurrent_search(tmp_path: Path) -> None:
    with (
        ThreadedServer(
            quick_settings(tmp_path / "unused.db", served_model()), fake_components()
        ) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        stub = pb_grpc.ClipSearchStub(channel)
        requests = [
            pb.IngestRequest(options=pb.IngestOptions(collection="c", create_collection=True)),
            pb.IngestRequest(items=[pb.IngestItem(seq=1, id="x1", image=jpeg(1))]),
        ]
        assert [a.status for a in acks_of(stub.Ingest(iter(requests), timeout=30))] == [
            pb.INGEST_STATUS_OK
        ]
        _check_concurrent_search(stub)


def _check_concurrent_search(stub: pb_grpc.ClipSearchStub) -> None:
    query = vector_of(stub, "x1")
    request = pb.SearchRequest(collection="c", vector=query, top_k=3)
    baseline = []
    for _ in range(30):
        started = time.perf_counter()
        stub.Search(request, timeout=30)
        baseline.append(time.perf_counter() - started)
    # Digits are the slowest text for CLIP's BPE found: ~0.1 s per 16 KiB text here.
    texts = [pb.EncodeInput(text=str(i % 10) * TEXT_CAP) for i in range(8)]
    big_took: list[float] = []

    big_timing: list[pb.Timing] = []

    def big_call() -> None:
        started = time.perf_counter()
        big_timing.append(stub.Encode(pb.EncodeRequest(inputs=texts), timeout=120).timing)
        big_took.append(time.perf_counter() - started)

    busy = threading.Thread(target=big_call)
    busy.start()
    during = _latencies_while(stub, query, busy)
    busy.join()
    assert big_took, "the big Encode failed"
    # The big call did take long, and the searches ran all through it.
    assert big_took[0] > 0.2, big_took
    # Tokenizing is the preprocess stage (pool wait included); the batcher's queue time
    # starts once it is done, so the stages add up to at most the total.
    t = big_timing[0]
    assert t.preprocess_us >= t.total_us // 2, t
    assert t.preprocess_us + t.queue_us + t.inference_us <= t.total_us, t
    assert len(during) >= 5, f"{len(during)} searches completed in {big_took[0]:.2f} s: {during}"
    # Each search's own work is a millisecond or two; it may wait for a core (the big call's
    # tokenizing holds one), never for the big call. The 95th percentile, not the maximum:
    # on a loaded shared CI machine a few scheduling hiccups of 20-40 ms are the OS's.
    typical, usual = statistics.quantiles(during, n=20)[-1], max(baseline)
    assert typical < usual + 0.05, (
        f"1 search in 20 took over {typical * 1e3:.1f} ms during the big Encode "
        f"({big_took[0]:.2f} s), none over {usual * 1e3:.1f} ms without it (medians "
        f"{statistics.median(during) * 1e3:.1f} and {statistics.median(baseline) * 1e3:.1f} ms)"
    )


# --- defect 5: unbounded search parameters and parser depth ------------------------------


def search_code(stub: pb_grpc.ClipSearchStub, **fields: Any) -> tuple[grpc.StatusCode, str]:
    request = pb.SearchRequest(collection="c", vector=vector_of(stub, "x1"), **fields)
    try:
        hits = stub.Search(request, timeout=30).hits
    except grpc.RpcError as error:
        failed: Any = error
        return failed.code(), failed.details()
    return grpc.StatusCode.OK, ",".join(h.id for h in hits)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ef": 2e8}, "'ef' must be between 1 and 16384"),
        ({"ef": 1e15}, "'ef' must be between 1 and 16384"),
        ({"nprobe": 1e9}, "'nprobe' must be between 1 and 65536"),
        ({"radius": -3}, "'radius' must be between -1 and 1"),
        ({"search_k": 10}, "unknown search param 'search_k'"),
        ({"drop_ratio_search": 0.1}, "unknown search param"),
    ],
)
def test_search_params_are_bounded(
    stub: pb_grpc.ClipSearchStub, params: dict[str, float], message: str
) -> None:
    code, details = search_code(stub, search_params=params)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert search_code(stub, search_params={"ef": 64, "nprobe": 8})[0] == grpc.StatusCode.OK


DEEP_FILTERS = {
    "2000 parentheses": "(" * 2000 + 'id == "x"' + ")" * 2000,
    "33 parentheses": "(" * 33 + 'id == "x"' + ")" * 33,
    "5000 nots": "not " * 5000 + 'id == "x"',
    "33 nots in parentheses": "not (" * 33 + 'id == "x"' + ")" * 33,
    "70 KB": 'id in ["' + "x" * 70_000 + '"]',
    "5000 ors": " or ".join(['id == "x"'] * 5000),
}


@pytest.mark.parametrize("name", list(DEEP_FILTERS))
def test_hostile_filters_are_refused_with_one_log_line(
    stub: pb_grpc.ClipSearchStub, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    hostile = DEEP_FILTERS[name]
    query = vector_of(stub, "x1")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code, message = code_of(
            lambda: stub.Search(
                pb.SearchRequest(collection="c", vector=query, filter=hostile), timeout=30
            )
        )
        count_code, _ = code_of(lambda: stub.Count(pb.CountRequest(collection="c", filter=hostile)))
    assert code == count_code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert len(message) < 500, message
    assert len(caplog.records) <= 2, [r.getMessage()[:200] for r in caplog.records]  # 2 calls
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


@pytest.mark.parametrize(
    ("expression", "found"),
    [
        ("(" * 30 + 'id == "x1"' + ")" * 30, "x1"),
        ("not " * 20 + 'id == "x1"', "x1"),
        ('caption == "smile :)" or id == "x1"', "x1"),  # brackets in strings do not count
        ("id in [" + ", ".join(f'"{i}"' for i in ["x1", *map(str, range(2000))]) + "]", "x1"),
        (" or ".join(f'id == "{i}"' for i in ["x1", *map(str, range(200))]), "x1"),
        ('not (id != "x1") and (not metadata["k"] == 1 or id == "x1")', "x1"),
    ],
)
def test_filters_within_the_bounds_still_work(
    stub: pb_grpc.ClipSearchStub, expression: str, found: str
) -> None:
    assert search_code(stub, filter=expression) == (grpc.StatusCode.OK, found)


# --- defect 6: wrong status codes ------------------------------------------------------------


def with_bad_utf8(message: Any, value: str) -> bytes:
    raw: bytes = message.SerializeToString()
    assert raw.count(value.encode()) == 1
    return raw.replace(value.encode(), b"\xff" * len(value.encode()))


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("Search", with_bad_utf8(pb.SearchRequest(collection="c", text="TEXT"), "TEXT")),
        ("Count", with_bad_utf8(pb.CountRequest(collection="NAME"), "NAME")),
        ("Encode", with_bad_utf8(pb.EncodeRequest(inputs=[pb.EncodeInput(text="TEXT")]), "TEXT")),
        ("Get", b"\x0a\xff\xff\xff"),  # a length past the end: corrupt wire format
    ],
    ids=["Search text", "Count collection", "Encode text", "Get corrupt"],
)
def test_undecodable_requests_are_invalid_argument(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture, method: str, body: bytes
) -> None:
    call = channel.unary_unary(f"/clipsearch.v1.ClipSearch/{method}")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code, message = code_of(lambda: call(body, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("the request message could not be decoded"), message
    assert "<class" not in message
    assert len(caplog.records) <= 1 and "Traceback" not in caplog.text


@pytest.mark.parametrize("method", ["EncodeStream", "Ingest"])
def test_an_undecodable_message_in_a_stream_ends_it_with_invalid_argument(
    channel: grpc.Channel, method: str
) -> None:
    if method == "Ingest":
        first = pb.IngestRequest(options=pb.IngestOptions(collection="c")).SerializeToString()
        bad = with_bad_utf8(pb.IngestRequest(items=[pb.IngestItem(seq=1, id="IDENT")]), "IDENT")
    else:
        first = pb.EncodeRequest(inputs=[pb.EncodeInput(text="fine")]).SerializeToString()
        bad = with_bad_utf8(pb.EncodeRequest(inputs=[pb.EncodeInput(text="TEXT")]), "TEXT")
    call = channel.stream_stream(f"/clipsearch.v1.ClipSearch/{method}")
    code, message = code_of(lambda: list(call(iter([first, bad]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert "could not be decoded" in message


def test_an_encode_larger_than_the_queue_is_invalid_argument_not_retryable(
    stub: pb_grpc.ClipSearchStub,
) -> None:
    for size in (QUEUE + 1, INPUTS_CAP + 1):
        request = pb.EncodeRequest(inputs=[pb.EncodeInput(text=f"t{i}") for i in range(size)])
        code, message = code_of(lambda: stub.Encode(request, timeout=30))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert f"{size} inputs in one request, at most {INPUTS_CAP} allowed" in message
        assert "max_inputs_per_request" in message
    inputs = [pb.EncodeInput(text=f"t{i}") for i in range(INPUTS_CAP)]
    assert len(stub.Encode(pb.EncodeRequest(inputs=inputs), timeout=60).embeddings) == INPUTS_CAP


def test_metadata_nested_30000_deep_fails_its_item_as_invalid_argument(
    stub: pb_grpc.ClipSearchStub,
) -> None:
    deep = '{"a":' + "[" * 30_000 + "]" * 30_000 + "}"
    requests = [
        pb.IngestRequest(options=pb.IngestOptions(collection="c")),
        pb.IngestRequest(
            items=[pb.IngestItem(seq=1, id="deep", image=jpeg(9), metadata_json=deep)]
        ),
        pb.IngestRequest(items=[pb.IngestItem(seq=2, id="x5", image=jpeg(5))]),
    ]
    acks = {a.seq: a for a in acks_of(stub.Ingest(iter(requests), timeout=30))}
    assert acks[1].status == pb.INGEST_STATUS_FAILED
    assert acks[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert acks[2].status == pb.INGEST_STATUS_OK


# --- defect 7: the filter escapes the more-like-this exclusion ---------------------------


def like(stub: pb_grpc.ClipSearchStub, expression: str) -> tuple[grpc.StatusCode, str]:
    request = pb.SearchRequest(collection="c", like_id="x0", filter=expression, top_k=10)
    try:
        hits = stub.Search(request, timeout=30).hits
    except grpc.RpcError as error:
        failed: Any = error
        return failed.code(), failed.details()
    return grpc.StatusCode.OK, ",".join(sorted(h.id for h in hits))


@pytest.mark.parametrize(
    "escape",
    [
        'id != "") or (id == "x0"',
        'id == "x0") or (true',
        'id == "x0")) or ((id == "x0"',
        'id == "x0"] or [1',
        "id == 'x0\" or id == 'x0'",
    ],
)
def test_a_filter_cannot_undo_the_like_id_exclusion(
    stub: pb_grpc.ClipSearchStub, escape: str
) -> None:
    code, details = like(stub, escape)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def test_like_id_with_a_filter_that_selects_the_item_still_excludes_it(
    stub: pb_grpc.ClipSearchStub,
) -> None:
    others = ",".join(sorted(set(IDS) - {"x0"}))
    assert like(stub, 'id == "x0" or id != ""') == (grpc.StatusCode.OK, others)
    assert like(stub, "") == (grpc.StatusCode.OK, others)
    assert like(stub, 'id == "x0"') == (grpc.StatusCode.OK, "")


# --- the checks themselves -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("(" * 33 + "a" + ")" * 33, "nested more than 32"),
        ("not " * 33 + "a", "nested more than 32"),
        ("!" * 20 + "(" * 13 + "a" + ")" * 13, "nested more than 32"),
        ("a in " + "[" * 33 + "]" * 33, "nested more than 32"),
        ("(a", "unclosed '('"),
        ("a)", "unbalanced ')'"),
        ("(a]", "unbalanced ']'"),
        ('a == "b', 'unclosed " quote'),
        ("a == 'b\\' or c", "unclosed ' quote"),
        (" or ".join("a" * 1 for _ in range(258)), "257 and/or operators"),
        ("x" * 65537, "65537 bytes long"),
        ("字" * 21846, "65538 bytes long"),
    ],
)
def test_check_filter_refuses(expression: str, problem: str) -> None:
    with pytest.raises(InvalidFilter, match=re.escape(problem)):
        check_filter(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "",
        "(" * 32 + "a" + ")" * 32,
        "not " * 32 + "a",
        # a not's reach ends at and/or on its level, so these nots never pile up
        " and ".join(["not a"] * 200),
        "(not " * 16 + "a" + ")" * 16,
        'id not in ["a", "b"] and caption not like "x%"',  # binary nots are not nesting
        'caption == "((((((((((((((((((((((((((((((((((((" and caption != \'"\'',
        " or ".join(["a"] * 257),
        "x" * 65536,
    ],
)
def test_check_filter_accepts(expression: str) -> None:
    assert check_filter(expression) == expression


def test_check_search_params() -> None:
    assert check_search_params({"ef": 64.0, "nprobe": 8, "level": 5, "radius": 0.2}) == {
        "ef": 64,
        "nprobe": 8,
        "level": 5,
        "radius": 0.2,
    }
    assert check_search_params(None) == {}
    for bad, message in [
        ({"ef": 16385}, "between 1 and 16384"),
        ({"ef": 1.5}, "positive integer"),
        ({"ef": True}, "finite number"),
        ({"range_filter": float("inf")}, "finite number"),
        ({"x" * 1000: 1}, "unknown search param 'xxxx"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            check_search_params(bad)
    with pytest.raises(ConfigurationError, match="search_params: unknown search param 'foo'"):
        IndexConfig.from_strings("HNSW", "IP", "", '{"foo": 1}')


def test_check_text_bytes_counts_utf8_bytes() -> None:
    check_text_bytes("a" * 100, 100, "t")
    check_text_bytes("字" * 33, 100, "t")
    with pytest.raises(InvalidInput, match=r"^t is 102 bytes, at most 100 allowed \(setting s\)$"):
        check_text_bytes("字" * 34, 100, "t", "s")
    with pytest.raises(InvalidInput, match="t is 101 characters, more than 100 bytes"):
        check_text_bytes("字" * 101, 100, "t")
    with pytest.raises(InvalidInput, match="lone surrogate"):
        check_text_bytes("\ud800" * 30, 100, "t")


def test_the_input_maximum_is_never_above_the_queue(tmp_path: Path) -> None:
    assert Settings().inputs_per_request == INPUTS_CAP
    assert Settings(max_queue=64).inputs_per_request == 64
    with pytest.raises(ConfigurationError, match="max_text_bytes must be > 0"):
        Settings(max_text_bytes=0)
    settings = quick_settings(tmp_path / "unused.db", served_model(), max_queue=8)
    with (
        ThreadedServer(settings, fake_components()) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        stub = pb_grpc.ClipSearchStub(channel)
        request = pb.EncodeRequest(inputs=[pb.EncodeInput(text=f"t{i}") for i in range(9)])
        code, message = code_of(lambda: stub.Encode(request, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "9 inputs in one request, at most 8 allowed" in message
        assert len(stub.Encode(pb.EncodeRequest(inputs=request.inputs[:8])).embeddings) == 8
