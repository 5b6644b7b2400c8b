"""The client against a real server: ClipSearchServer on port 0 (its event loop in a thread),
the committed demo model, a temporary Milvus Lite file.

Covers encoding (batch == single), search in every query kind and target, streaming ingest
with exact counts and resume after the server restarts mid-stream, typed errors, token auth,
gRPC retries, profile, and the CLI end to end.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from server_fixtures import ThreadedServer, quick_settings, served_model
from tls_fixtures import make_pki, needs_openssl

from clipsearch.cli import main
from clipsearch.client import (
    AlreadyExists,
    AsyncClient,
    Backoff,
    Client,
    DeadlineExceeded,
    IngestItem,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from clipsearch.client.channel import TlsConfig
from clipsearch.client.types import ImageInput
from clipsearch.export.demo_data import GalleryItem, generate_gallery
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

GALLERY_SIZE = 24
LONG_TEXT = " ".join(["a red circle next to a blue square"] * 20)  # far over 77 tokens


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle() -> Path:
    return served_model()


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    db = tmp_path_factory.mktemp("client-it") / "clipsearch.db"
    with ThreadedServer(quick_settings(db, bundle)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ThreadedServer) -> Iterator[Client]:
    with Client(server.address, timeout=30) as connected:
        yield connected


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[GalleryItem]]:
    root = tmp_path_factory.mktemp("gallery")
    return root, generate_gallery(root, GALLERY_SIZE, seed=0)


@pytest.fixture(scope="module")
def ingested(
    client: Client, gallery: tuple[Path, list[GalleryItem]]
) -> tuple[str, list[GalleryItem]]:
    """The gallery ingested from its CSV manifest into collection "gallery"."""
    root, items = gallery
    summary = client.ingest_path(
        root / "manifest.csv", caption_field="caption_en", collection="gallery", progress=False
    )
    assert (summary.ok, summary.failed, summary.skipped) == (GALLERY_SIZE, 0, 0)
    return "gallery", items


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size: int = 48) -> bytes:
    image = Image.new("RGB", (size, size), colour)
    image.paste((255 - colour[0], 255 - colour[1], 255 - colour[2]), (8, 8, size // 2, size // 2))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def assert_unit_rows(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


# --- model and encoding ------------------------------------------------------------------


def test_info(client: Client) -> None:
    info = client.info()
    assert info.dim > 0
    assert info.model_id
    assert "CPUExecutionProvider" in info.text.providers
    assert info.store == "milvus-lite"
    assert info.timing.total_us > 0


def test_encode_texts_batch_equals_single(client: Client) -> None:
    texts = ["a red circle", "红色的圆形", "a blue square on a dark background", LONG_TEXT]
    batch = client.encode_texts(texts)
    assert batch.vectors.shape == (4, client.info().dim)
    assert batch.vectors.dtype == np.float32
    assert batch.truncated == [False, False, False, True]
    assert_unit_rows(batch.vectors)
    for row, text in enumerate(texts):
        single = client.encode_texts([text])
        np.testing.assert_allclose(single.vectors[0], batch.vectors[row], atol=1e-5)
    assert batch.timing.batch_size >= 1
    assert batch.timing.inference_us > 0


def test_encode_images_batch_equals_single(client: Client, tmp_path: Path) -> None:
    jpeg = image_bytes((200, 30, 30), "JPEG")
    png = image_bytes((30, 30, 200), "PNG")
    path = tmp_path / "green.png"
    path.write_bytes(image_bytes((30, 200, 30)))
    batch = client.encode_images([jpeg, png, path])
    assert batch.vectors.shape[0] == 3
    assert_unit_rows(batch.vectors)
    images: list[ImageInput] = [jpeg, png, str(path)]
    for row, image in enumerate(images):
        single = client.encode_images([image])
        np.testing.assert_allclose(single.vectors[0], batch.vectors[row], atol=1e-5)
    assert batch.timing.preprocess_us > 0


def test_encode_stream_answers_in_order_and_reports_failures_per_request(
    client: Client,
) -> None:
    png = image_bytes((10, 120, 240))
    batches: list[list[str | bytes]] = [["a red circle", png], [b"not an image"], ["blue"]]
    results = list(client.encode_stream(batches))
    assert [r.request_id for r in results] == [0, 1, 2]
    first, failed, last = results
    assert failed.error is not None and isinstance(failed.error, InvalidArgument)
    with pytest.raises(InvalidArgument):
        failed.raise_for_error()
    assert first.error is None and last.error is None
    np.testing.assert_allclose(
        first.vectors[0], client.encode_texts(["a red circle"]).vectors[0], atol=1e-5
    )
    np.testing.assert_allclose(first.vectors[1], client.encode_images([png]).vectors[0], atol=1e-5)
    np.testing.assert_allclose(last.vectors[0], client.encode_texts(["blue"]).vectors[0], atol=1e-5)


# --- ingest ------------------------------------------------------------------------------


def test_ingest_manifest_exact_counts_and_fields(
    client: Client,
    ingested: tuple[str, list[GalleryItem]],
    gallery: tuple[Path, list[GalleryItem]],
) -> None:
    collection, items = ingested
    root, _ = gallery
    assert client.count(collection=collection) == GALLERY_SIZE
    first = items[0]
    (stored,) = client.get([first.id], collection=collection)
    assert stored.caption == first.caption_en
    assert stored.uri == (root / first.path).resolve().as_posix()
    assert stored.metadata["caption_zh"] == first.caption_zh
    assert stored.metadata["n_objects"] == first.n_objects  # an int, not "1"
    assert "caption_en" not in stored.metadata
    # Ingesting again upserts: the same count.
    summary = client.ingest_path(
        root / "manifest.jsonl", caption_field="caption_en", collection=collection, progress=False
    )
    assert summary.ok == GALLERY_SIZE
    assert client.count(collection=collection) == GALLERY_SIZE
    # With skip_existing nothing is re-encoded.
    skipped = client.ingest_path(
        root / "manifest.csv",
        caption_field="caption_en",
        collection=collection,
        skip_existing=True,
        progress=False,
    )
    assert (skipped.ok, skipped.failed, skipped.skipped) == (0, 0, GALLERY_SIZE)


def test_ingest_directory_uses_relative_posix_ids(
    client: Client, gallery: tuple[Path, list[GalleryItem]]
) -> None:
    root, items = gallery
    summary = client.ingest_path(root, collection="from_dir", progress=False)
    assert summary.ok == GALLERY_SIZE
    stored = client.get([items[3].path], collection="from_dir")
    assert [s.id for s in stored] == [items[3].path]  # "images/demo-0-000003.jpg"
    assert stored[0].uri == (root / items[3].path).resolve().as_posix()


def test_ingest_stream_results_per_item(client: Client) -> None:
    items = [
        IngestItem(id="ok-1", image=image_bytes((255, 0, 0)), caption="red", metadata={"k": 1}),
        IngestItem(id="broken", image=b"\xff\xd8 not really a jpeg"),
        IngestItem(image=image_bytes((0, 0, 255))),  # no id: the content hash
    ]
    stream = client.ingest(items, collection="per_item")
    results = {r.seq: r for r in stream}
    assert sorted(results) == [0, 1, 2]
    assert results[0].status == "ok" and results[0].id == "ok-1"
    assert results[1].status == "failed"
    assert results[1].error_code == "INVALID_ARGUMENT"
    assert results[1].error
    assert results[2].status == "ok" and len(results[2].id) == 32
    assert (stream.summary.ok, stream.summary.failed) == (2, 1)
    assert client.count(collection="per_item") == 2


def test_ingest_without_create_into_unknown_collection_is_not_found(client: Client) -> None:
    stream = client.ingest(
        [IngestItem(id="x", image=image_bytes((1, 2, 3)))],
        collection="never_created",
        create_collection=False,
    )
    with pytest.raises(NotFound):
        list(stream)


def _generated_items(n: int) -> Iterator[IngestItem]:
    for k in range(n):
        colour = (k * 37 % 256, k * 91 % 256, k * 13 % 256)
        yield IngestItem(id=f"item-{k:04d}", image=image_bytes(colour, size=24))


def test_ingest_resumes_after_the_server_restarts_mid_stream(
    client: Client, server: ThreadedServer
) -> None:
    total = 120
    stream = client.ingest(
        _generated_items(total),
        collection="resume_sync",
        window=16,
        backoff=Backoff(initial_s=0.05),
    )
    seqs = []
    for result in stream:
        assert result.status == "ok", result.error
        seqs.append(result.seq)
        if len(seqs) == 10:
            server.restart()  # in-flight items are cut off; the client must resend them
    assert sorted(seqs) == list(range(total))  # each item reported exactly once
    assert stream.reconnects == 1
    assert client.count(collection="resume_sync") == total  # upserts: no duplicates


async def test_async_ingest_resumes_after_the_server_restarts_mid_stream(
    server: ThreadedServer,
) -> None:
    total = 80
    async with AsyncClient(server.address) as aclient:
        stream = aclient.ingest(
            _generated_items(total),
            collection="resume_async",
            window=8,
            backoff=Backoff(initial_s=0.05),
        )
        seqs = []
        async for result in stream:
            seqs.append(result.seq)
            if len(seqs) == 5:
                await asyncio.to_thread(server.restart)
        assert sorted(seqs) == list(range(total))
        assert stream.reconnects == 1
        assert await aclient.count(collection="resume_async") == total


# --- search ------------------------------------------------------------------------------


def test_search_every_query_kind_and_target(
    client: Client,
    ingested: tuple[str, list[GalleryItem]],
    gallery: tuple[Path, list[GalleryItem]],
) -> None:
    collection, items = ingested
    root, _ = gallery
    ids = {item.id for item in items}
    for target in ("image", "caption", "both"):
        result = client.search("a red circle", target=target, top_k=5, collection=collection)
        assert len(result.hits) == 5
        assert {hit.id for hit in result.hits} <= ids
        scores = [hit.score for hit in result.hits]
        assert scores == sorted(scores, reverse=True)
        assert result.timing.total_us > 0
    by_path = client.search(image=root / items[0].path, top_k=3, collection=collection)
    by_bytes = client.search(
        image=(root / items[0].path).read_bytes(), top_k=3, collection=collection
    )
    assert by_path.hits == by_bytes.hits
    assert by_path.hits[0].id == items[0].id  # an image is its own nearest neighbour

    (stored,) = client.get([items[5].id], include_vectors=True, collection=collection)
    assert stored.image_vector is not None and stored.caption_vector is not None
    by_vector = client.search(vector=stored.image_vector, top_k=3, collection=collection)
    assert by_vector.hits[0].id == items[5].id
    assert by_vector.hits[0].score == pytest.approx(1.0, abs=1e-4)
    like = client.search(like=items[5].id, top_k=3, collection=collection)
    assert items[5].id not in {hit.id for hit in like.hits}  # "more like this" excludes itself
    assert [h.id for h in like.hits[:2]] == [h.id for h in by_vector.hits[1:3]]
    by_caption = client.search(
        vector=stored.caption_vector, target="caption", top_k=1, collection=collection
    )
    assert by_caption.hits[0].caption == items[5].caption_en


def test_search_pages_filters_and_output_fields(
    client: Client, ingested: tuple[str, list[GalleryItem]]
) -> None:
    collection, items = ingested
    whole = client.search("a star", top_k=8, collection=collection)
    first = client.search("a star", top_k=4, collection=collection)
    second = client.search("a star", top_k=4, offset=4, collection=collection)
    assert [h.id for h in first.hits + second.hits] == [h.id for h in whole.hits]

    dark = {item.id for item in items if item.background == "dark"}
    filtered = client.search(
        "a star",
        top_k=GALLERY_SIZE,
        filter='metadata["background"] == "dark"',
        collection=collection,
    )
    assert {hit.id for hit in filtered.hits} == dark
    assert client.count('metadata["background"] == "dark"', collection=collection) == len(dark)

    only_uri = client.search("a star", top_k=2, output_fields=["uri"], collection=collection)
    assert all(hit.uri and not hit.caption and not hit.metadata for hit in only_uri.hits)


def test_query_truncation_is_reported(
    client: Client, ingested: tuple[str, list[GalleryItem]]
) -> None:
    collection, _ = ingested
    assert client.search(LONG_TEXT, top_k=1, collection=collection).query_truncated
    assert not client.search("a star", top_k=1, collection=collection).query_truncated


# --- items and collections -----------------------------------------------------------------


def test_get_delete_and_collections(client: Client) -> None:
    assert client.create_collection("scratch") is True
    assert client.create_collection("scratch", exist_ok=True) is False
    with pytest.raises(AlreadyExists):
        client.create_collection("scratch")
    items = [IngestItem(id=f"s{k}", image=image_bytes((k * 60, 0, 0))) for k in range(3)]
    assert client.ingest(items, collection="scratch").run().ok == 3
    listed = {c.name: c for c in client.list_collections()}
    assert listed["scratch"].count == 3
    assert listed["scratch"].dim == client.info().dim
    assert [i.id for i in client.get(["s2", "missing", "s0"], collection="scratch")] == [
        "s2",
        "s0",
    ]
    assert client.delete(["s0", "missing"], collection="scratch") == 1
    assert client.count(collection="scratch") == 2
    assert client.get(["s0"], collection="scratch") == []
    client.drop_collection("scratch")
    assert "scratch" not in {c.name for c in client.list_collections()}
    with pytest.raises(NotFound):
        client.drop_collection("scratch")


# --- typed errors --------------------------------------------------------------------------


def test_typed_errors(client: Client, ingested: tuple[str, list[GalleryItem]]) -> None:
    collection, _ = ingested
    with pytest.raises(InvalidArgument, match="image"):
        client.encode_images([b"GIF89a but corrupt"])
    with pytest.raises(InvalidArgument, match="empty"):
        client.search("   ", collection=collection)
    with pytest.raises(NotFound, match="nope"):
        client.search("a star", collection="nope")
    with pytest.raises(NotFound):
        client.count(collection="nope")
    with pytest.raises(NotFound):
        client.search(like="no-such-id", collection=collection)
    with pytest.raises(InvalidArgument):
        client.search("a star", filter="metadata[ == ", collection=collection)
    with pytest.raises(InvalidArgument, match="dimension"):
        client.search(vector=np.ones(3, np.float32), collection=collection)
    with pytest.raises(DeadlineExceeded):
        client.search("a star", collection=collection, timeout=1e-4)
    # The server keeps serving after all that.
    assert client.count(collection=collection) == GALLERY_SIZE


def test_token_auth(bundle: Path, tmp_path: Path) -> None:
    settings = quick_settings(tmp_path / "auth.db", bundle, auth_token="s3cret")
    with ThreadedServer(settings) as secured:
        with Client(secured.address) as anonymous, pytest.raises(Unauthenticated):
            anonymous.info()
        with Client(secured.address, token="wrong") as wrong, pytest.raises(Unauthenticated):
            wrong.count()
        with Client(secured.address, token="s3cret") as authorized:
            assert authorized.info().dim > 0
            stream = authorized.ingest(
                [IngestItem(id="a", image=image_bytes((9, 9, 9)))], collection="auth"
            )
            assert stream.run().ok == 1
        with Client(secured.address) as anonymous, pytest.raises(Unauthenticated):
            anonymous.ingest(
                [IngestItem(id="b", image=image_bytes((8, 8, 8)))], collection="auth"
            ).run()
        code = main(["count", "--collection", "auth", "--server", secured.address, "--json"])
        assert code == 1
        assert (
            main(
                ["count", "--collection", "auth", "--server", secured.address, "--token", "s3cret"]
            )
            == 0
        )


# --- retries (a real gRPC server with a scripted servicer) ---------------------------------


class FlakyServicer(pb_grpc.ClipSearchServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def _flaky(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            failing = self.calls[method] <= self.failures
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "store briefly down")

    def Count(self, request: pb.CountRequest, context: grpc.ServicerContext) -> pb.CountResponse:
        self._flaky("Count", context)
        return pb.CountResponse(count=42)

    def DropCollection(
        self, request: pb.DropCollectionRequest, context: grpc.ServicerContext
    ) -> pb.DropCollectionResponse:
        self._flaky("DropCollection", context)
        return pb.DropCollectionResponse()


def _flaky_server(failures: int) -> tuple[grpc.Server, FlakyServicer, str]:
    servicer = FlakyServicer(failures)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ClipSearchServicer_to_server(servicer, grpc_server)  # type: ignore[no-untyped-call]
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    return grpc_server, servicer, f"127.0.0.1:{port}"


def test_idempotent_calls_are_retried_and_drop_is_not() -> None:
    grpc_server, servicer, address = _flaky_server(failures=2)
    try:
        with Client(address, timeout=10) as client:
            assert client.count() == 42
            assert servicer.calls["Count"] == 3  # two UNAVAILABLE answers retried by gRPC
            with pytest.raises(Unavailable, match="store briefly down"):
                client.drop_collection("x")
            assert servicer.calls["DropCollection"] == 1
    finally:
        grpc_server.stop(None)


def test_retries_can_be_turned_off() -> None:
    grpc_server, servicer, address = _flaky_server(failures=1)
    try:
        with Client(address, retry=False) as client, pytest.raises(Unavailable):
            client.count()
        assert servicer.calls["Count"] == 1
    finally:
        grpc_server.stop(None)


async def test_async_client_retries_like_the_sync_one() -> None:
    grpc_server, servicer, address = _flaky_server(failures=2)
    try:
        async with AsyncClient(address, timeout=10) as aclient:
            assert await aclient.count() == 42
            assert servicer.calls["Count"] == 3
    finally:
        grpc_server.stop(None)


# --- TLS (the scripted servicer behind ssl_server_credentials) -----------------------------


@needs_openssl
def test_mutual_tls(tmp_path: Path) -> None:
    make_pki(tmp_path)
    pem = {file.name: file.read_bytes() for file in tmp_path.iterdir()}
    credentials = grpc.ssl_server_credentials(
        [(pem["clipsearch.test.key"], pem["clipsearch.test.pem"])],
        root_certificates=pem["ca.pem"],
        require_client_auth=True,
    )
    servicer = FlakyServicer(failures=0)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ClipSearchServicer_to_server(servicer, grpc_server)  # type: ignore[no-untyped-call]
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    address = f"127.0.0.1:{port}"
    try:
        mutual = TlsConfig(
            root_certificates=pem["ca.pem"],
            certificate_chain=pem["client.test.pem"],
            private_key=pem["client.test.key"],
            server_name_override="clipsearch.test",
        )
        with Client(address, tls=mutual, timeout=10) as client:
            assert client.count() == 42
        server_only = TlsConfig(
            root_certificates=pem["ca.pem"], server_name_override="clipsearch.test"
        )
        with Client(address, tls=server_only, retry=False) as client, pytest.raises(Unavailable):
            client.count()  # the server requires a client certificate
        with Client(address, retry=False) as plaintext, pytest.raises(Unavailable):
            plaintext.count()
    finally:
        grpc_server.stop(None)


# --- profile and the async client ------------------------------------------------------------


def test_profile(client: Client, ingested: tuple[str, list[GalleryItem]]) -> None:
    collection, _ = ingested
    profile = client.profile("a red circle", collection=collection, repeat=3)
    assert len(profile.samples) == 3
    for sample in profile.samples:
        assert sample.round_trip_us >= sample.timing.total_us > 0
        assert sample.timing.search_us > 0
    text = profile.render()
    assert "round trip" in text and "└── server total" in text and "median of 3 calls" in text
    encode = client.profile("a red circle", call="encode")
    assert encode.samples[0].timing.inference_us > 0
    assert encode.samples[0].timing.search_us == 0


async def test_async_client_matches_the_sync_one(
    server: ThreadedServer, client: Client, ingested: tuple[str, list[GalleryItem]]
) -> None:
    collection, items = ingested
    async with AsyncClient(server.address) as aclient:
        assert (await aclient.info()).model_id == client.info().model_id
        vectors = (await aclient.encode_texts(["a red circle"])).vectors
        np.testing.assert_allclose(
            vectors, client.encode_texts(["a red circle"]).vectors, atol=1e-5
        )
        result = await aclient.search("a red circle", top_k=5, collection=collection)
        assert [h.id for h in result.hits] == [
            h.id for h in client.search("a red circle", top_k=5, collection=collection).hits
        ]
        streamed = [r async for r in aclient.encode_stream([["a"], [b"bad"], ["b"]])]
        assert [r.error is None for r in streamed] == [True, False, True]
        with pytest.raises(NotFound):
            await aclient.count(collection="nope")
        got = await aclient.get([items[0].id], collection=collection)
        assert got[0].caption == items[0].caption_en
        profile = await aclient.profile("a star", collection=collection, repeat=2)
        assert len(profile.samples) == 2


# --- the CLI end to end ----------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_end_to_end(
    server: ThreadedServer,
    gallery: tuple[Path, list[GalleryItem]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    root, items = gallery
    at = ("--server", server.address)
    manifest = str(root / "manifest.csv")

    code, out, _ = run_cli(
        capsys, "ingest", manifest, "--collection", "cli", "--caption-field", "caption_en",
        "--json", "--quiet", *at,
    )  # fmt: skip
    assert code == 0
    assert json.loads(out) == {"ok": GALLERY_SIZE, "failed": 0, "skipped": 0, "errors": []}

    code, out, _ = run_cli(
        capsys, "ingest", manifest, "--collection", "cli", "--caption-field", "caption_en",
        "--skip-existing", "--quiet", *at,
    )  # fmt: skip
    assert code == 0
    assert out.startswith(f"0 ok, 0 failed, {GALLERY_SIZE} skipped")

    code, out, _ = run_cli(capsys, "count", "--collection", "cli", *at)
    assert (code, out) == (0, f"{GALLERY_SIZE}\n")

    code, out, _ = run_cli(
        capsys, "search", "a red circle", "--collection", "cli", "--top-k", "3", "--json", *at
    )
    assert code == 0
    result = json.loads(out)
    assert len(result["hits"]) == 3
    assert set(result["hits"][0]) == {"id", "score", "uri", "caption", "metadata"}
    assert result["timing"]["total_us"] > 0

    code, out, _ = run_cli(capsys, "search", "a red circle", "--collection", "cli", *at)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["rank", "score", "id", "caption", "uri"]
    assert len(lines) == 1 + 10 + 1 and lines[-1].startswith("timing: ")

    query_image = str(root / items[1].path)
    code, out, _ = run_cli(
        capsys, "search", "--image", query_image, "--target", "caption", "--collection", "cli",
        "--top-k", "2", "--json", *at,
    )  # fmt: skip
    assert code == 0 and len(json.loads(out)["hits"]) == 2

    code, out, _ = run_cli(
        capsys, "search", "--like", items[1].id, "--collection", "cli", "--json", "--offset",
        "2", "--filter", 'metadata["n_objects"] >= 1', *at,
    )  # fmt: skip
    assert code == 0
    assert items[1].id not in {hit["id"] for hit in json.loads(out)["hits"]}

    code, out, _ = run_cli(capsys, "get", items[2].id, "--collection", "cli", *at)
    assert code == 0 and json.loads(out)["caption"] == items[2].caption_en
    code, out, err = run_cli(capsys, "get", items[2].id, "gone", "--collection", "cli", *at)
    assert code == 1 and err == "clipsearch get: not found: gone\n"

    code, out, _ = run_cli(capsys, "delete", items[2].id, "--collection", "cli", "--json", *at)
    assert (code, json.loads(out)) == (0, {"deleted": 1})

    code, out, _ = run_cli(capsys, "collections", "--json", *at)
    listed = {c["name"]: c for c in json.loads(out)}
    assert code == 0 and listed["cli"]["count"] == GALLERY_SIZE - 1
    assert run_cli(capsys, "collections", "create", "cli_tmp", *at)[1] == "created cli_tmp\n"
    assert run_cli(capsys, "collections", "drop", "cli_tmp", *at)[1] == "dropped cli_tmp\n"

    code, out, _ = run_cli(capsys, "info", "--json", *at)
    assert code == 0 and json.loads(out)["dim"] > 0

    code, out, _ = run_cli(capsys, "profile", "a red circle", "--collection", "cli", *at)
    assert code == 0 and "└── server total" in out and "inference" in out

    code, out, err = run_cli(capsys, "search", "a star", "--collection", "nope", *at)
    assert code == 1 and out == ""
    assert err.startswith("clipsearch search: NOT_FOUND: ") and "Traceback" not in err

    # A directory with one corrupt image: the good ones land, the command says why and fails.
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes(image_bytes((1, 2, 3)))
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    code, out, _ = run_cli(capsys, "ingest", str(folder), "--collection", "cli_dir", "--quiet", *at)
    assert code == 1
    assert out.splitlines()[0].startswith("1 ok, 1 failed, 0 skipped")
    assert out.splitlines()[1:3][0] == "failed:"
    assert out.splitlines()[2].startswith("  bad.jpg: ")


def test_wait_until_ready(server: ThreadedServer) -> None:
    with Client(server.address) as client:
        assert client.wait_until_ready(timeout=5).dim > 0
    with Client("127.0.0.1:1") as nowhere, pytest.raises(Unavailable, match="not ready within"):
        nowhere.wait_until_ready(timeout=0.5)


def test_cli_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "info", "--server", "127.0.0.1:1", "--timeout", "5")
    assert code == 1 and out == ""
    assert err.startswith("clipsearch info: UNAVAILABLE: ")
