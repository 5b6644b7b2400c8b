"""The HTTP face of `clipsearch web` over real HTTP (uvicorn on port 0) in front of real gRPC
servers on port 0 (the fake backend and in-memory store, for speed): every endpoint, the
one error mapping, the media root's refusals, OpenAI's response shape. The real demo model,
where meaning matters, is in test_web_demo.py."""

from __future__ import annotations

import base64
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from server_fixtures import ThreadedServer, quick_settings

from clipsearch.client import Client, IngestItem
from clipsearch.client.errors import error_for
from clipsearch.server.app import fake_components
from clipsearch.web.backends import WebConfig
from clipsearch.web.media import MediaRoot, ThumbnailCache, make_thumbnail
from clipsearch.web.serve import WebServer

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}
N_PER_COLOUR = 4


def png(rgb: tuple[int, int, int], size: int = 300) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(out, "PNG")
    return out.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@dataclass
class Site:
    http: httpx.Client
    web: WebServer
    grpc: Client
    other: Client
    media: Path
    outside: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("web")
    media, outside = base / "media", base / "outside"
    (media / "shapes").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(png((1, 2, 3)))
    (media / "link.png").symlink_to(outside / "secret.png")
    (media / "escape").symlink_to(outside, target_is_directory=True)
    items = []
    for colour, rgb in COLOURS.items():
        for n in range(N_PER_COLOUR):
            path = media / "shapes" / f"{colour}-{n}.png"
            path.write_bytes(png((rgb[0], rgb[1] + n, rgb[2])))
            items.append(
                IngestItem(
                    id=f"{colour}-{n}",
                    path=path,
                    uri=str(path) if n % 2 == 0 else f"shapes/{colour}-{n}.png",
                    caption=f"a {colour} square",
                    metadata={"colour": colour, "n": n},
                )
            )
    items.append(
        IngestItem(id="remote", image=png((9, 9, 9)), uri="http://127.0.0.1:9/x.png", caption="x")
    )
    with (
        ThreadedServer(quick_settings(base / "a.db"), fake_components()) as a,
        ThreadedServer(quick_settings(base / "b.db"), fake_components()) as b,
        Client(a.address) as grpc_a,
        Client(b.address) as grpc_b,
    ):
        assert grpc_a.ingest(items, collection="shapes").run().ok == len(items)
        assert grpc_a.ingest(items[:5], collection="few").run().ok == 5
        assert grpc_b.ingest(items[5:], collection="more").run().ok == len(items) - 5
        config = WebConfig(servers=(a.address, b.address), media_root=media)
        with WebServer(config) as web, httpx.Client(base_url=web.url, timeout=30) as http:
            yield Site(http, web, grpc_a, grpc_b, media, outside)


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "type"}
    return response.status_code, body["error"]["code"]


# --- the page -------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_and_name_no_other_host(site: Site) -> None:
    page = site.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for needed in ('id="q"', 'id="target"', 'id="collection"', 'id="filter"', 'id="topk"'):
        assert needed in page.text
    assert '<script type="module" src="/static/app.js">' in page.text
    for name, media_type in (("app.js", "javascript"), ("style.css", "text/css")):
        response = site.http.get(f"/static/{name}")
        assert response.status_code == 200 and media_type in response.headers["content-type"]
        assert "http://" not in response.text and "https://" not in response.text
    assert "http://" not in page.text and "https://" not in page.text
    assert site.http.get("/docs").status_code == 404  # Swagger UI would load a CDN


def test_openapi_describes_every_endpoint(site: Site) -> None:
    spec = site.http.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/api/info",
        "/api/collections",
        "/api/search",
        "/api/search/upload",
        "/api/encode",
        "/api/thumbnail",
        "/v1/embeddings",
        "/v1/models",
    }
    assert set(spec["paths"]["/v1/embeddings"]) == {"post"}
    schemas = spec["components"]["schemas"]
    assert {"SearchIn", "SearchOut", "EmbeddingsIn", "EmbeddingsOut"} <= set(schemas)


# --- info, collections, search ---------------------------------------------------------------


def test_info_lists_both_servers_and_their_model(site: Site) -> None:
    body = site.http.get("/api/info").json()
    served = site.grpc.info()
    assert body["thumbnails"] is True
    assert [s["index"] for s in body["servers"]] == [0, 1]
    assert {s["model_name"] for s in body["servers"]} == {served.model_name}
    assert all(s["dim"] == served.dim and s["error"] is None for s in body["servers"])


def test_collections_of_every_server(site: Site) -> None:
    body = site.http.get("/api/collections").json()
    found = {(c["server"], c["name"]): (c["count"], c["searchable"]) for c in body["collections"]}
    total = len(COLOURS) * N_PER_COLOUR + 1
    assert found == {
        (0, "shapes"): (total, True),
        (0, "few"): (5, True),
        (1, "more"): (total - 5, True),
    }
    assert body["errors"] == []


def hits_of(body: dict[str, Any]) -> list[tuple[str, float]]:
    return [(h["id"], h["score"]) for h in body["hits"]]


def test_text_search_is_the_grpc_result_with_thumbnails_and_timing(site: Site) -> None:
    response = site.http.post(
        "/api/search", json={"text": "a red square", "collection": "shapes", "top_k": 5}
    )
    assert response.status_code == 200
    body = response.json()
    direct = site.grpc.search("a red square", collection="shapes", top_k=5)
    assert hits_of(body) == [(h.id, h.score) for h in direct.hits]
    assert len(body["hits"]) == 5
    assert set(body["timing"]) == {
        "queue_us", "preprocess_us", "inference_us", "search_us", "total_us", "batch_size"
    }  # fmt: skip
    assert body["timing"]["total_us"] > 0 and body["round_trip_ms"] > 0
    for hit in body["hits"]:
        expected = None if hit["id"] == "remote" else f"/api/thumbnail?uri={quote(hit['uri'])}"
        assert hit["thumbnail"] == expected
        assert hit["caption"] == direct.hits[body["hits"].index(hit)].caption


def quote(value: str) -> str:
    from urllib.parse import quote as url_quote

    return url_quote(value, safe="")


def test_pages_filter_and_target_follow_the_server(site: Site) -> None:
    query = {"text": "square", "collection": "shapes", "top_k": 4}
    pages = [
        hits_of(site.http.post("/api/search", json={**query, "offset": offset}).json())
        for offset in (0, 4, 8)
    ]
    everything = site.grpc.search("square", collection="shapes", top_k=12)
    assert [hit for page in pages for hit in page] == [(h.id, h.score) for h in everything.hits]
    blue = site.http.post(
        "/api/search", json={**query, "filter": 'metadata["colour"] == "blue"', "top_k": 10}
    ).json()
    assert sorted(h["id"] for h in blue["hits"]) == [f"blue-{n}" for n in range(N_PER_COLOUR)]
    captions = site.http.post("/api/search", json={**query, "target": "caption"}).json()
    direct = site.grpc.search("square", collection="shapes", top_k=4, target="caption")
    assert hits_of(captions) == [(h.id, h.score) for h in direct.hits]


def test_more_like_this_and_the_second_server(site: Site) -> None:
    like = site.http.post("/api/search", json={"like": "red-1", "collection": "shapes"}).json()
    direct = site.grpc.search(like="red-1", collection="shapes", top_k=10)
    assert hits_of(like) == [(h.id, h.score) for h in direct.hits]
    assert "red-1" not in [h["id"] for h in like["hits"]]
    other = site.http.post(
        "/api/search", json={"text": "a green square", "collection": "more", "server": 1}
    ).json()
    direct = site.other.search("a green square", collection="more", top_k=10)
    assert other["server"] == 1 and hits_of(other) == [(h.id, h.score) for h in direct.hits]


def test_image_search_by_data_uri_base64_and_upload_agree(site: Site) -> None:
    query = png((200, 40, 40), size=64)
    direct = site.grpc.search(image=query, collection="shapes", target="caption", top_k=6)
    expected = [(h.id, h.score) for h in direct.hits]
    common = {"collection": "shapes", "target": "caption", "top_k": 6}
    for image in (data_uri(query), base64.b64encode(query).decode()):
        body = site.http.post("/api/search", json={**common, "image": image}).json()
        assert hits_of(body) == expected
    upload = site.http.post(
        "/api/search/upload",
        files={"file": ("q.png", query, "image/png")},
        data={"collection": "shapes", "target": "caption", "top_k": "6"},
    )
    assert upload.status_code == 200, upload.text
    assert hits_of(upload.json()) == expected


def test_encode_returns_the_servers_vectors(site: Site) -> None:
    image = png((10, 200, 10), size=48)
    body = site.http.post(
        "/api/encode", json={"texts": ["a red circle", "红色的圆形"], "images": [data_uri(image)]}
    ).json()
    texts = site.grpc.encode_texts(["a red circle", "红色的圆形"])
    images = site.grpc.encode_images([image])
    np.testing.assert_array_equal(np.array(body["text_vectors"], dtype=np.float32), texts.vectors)
    np.testing.assert_array_equal(np.array(body["image_vectors"], dtype=np.float32), images.vectors)
    assert body["dim"] == texts.vectors.shape[1] and body["truncated"] == [False, False]
    assert len(body["timing"]) == 2


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/api/search", {"collection": "shapes"}, 400, "INVALID_ARGUMENT"),
        ("/api/search", {"text": "x", "like": "red-1"}, 400, "INVALID_ARGUMENT"),
        ("/api/search", {"text": "x", "top_k": 0}, 400, "INVALID_ARGUMENT"),
        ("/api/search", {"text": "x", "target": "video"}, 400, "INVALID_ARGUMENT"),
        ("/api/search", {"text": "x", "collection": "nope"}, 404, "NOT_FOUND"),
        ("/api/search", {"like": "nope", "collection": "shapes"}, 404, "NOT_FOUND"),
        ("/api/search", {"text": "x", "collection": "shapes", "filter": "((("}, 400,
         "INVALID_ARGUMENT"),
        ("/api/search", {"text": "x", "server": 7}, 404, "NOT_FOUND"),
        ("/api/search", {"image": "not base64!", "collection": "shapes"}, 400, "INVALID_ARGUMENT"),
        ("/api/search", {"image": "data:text/plain;base64,aGk=", "collection": "shapes"}, 400,
         "INVALID_ARGUMENT"),
        ("/api/search", {"image": base64.b64encode(b"not an image").decode(),
                         "collection": "shapes"}, 400, "INVALID_ARGUMENT"),
        ("/api/search", {"image": "http://127.0.0.1:9/x.png"}, 403, "PERMISSION_DENIED"),
        ("/api/encode", {}, 400, "INVALID_ARGUMENT"),
        ("/api/nothing", {}, 404, "NOT_FOUND"),
    ],
)  # fmt: skip
def test_errors_map_to_http_statuses(
    site: Site, path: str, body: dict[str, Any], status: int, code: str
) -> None:
    assert error_of(site.http.post(path, json=body)) == (status, code)


# The table every error goes through, written out here so that a change to it shows.
EXPECTED_HTTP = {
    "OK": 500,  # never raised; a ClipsearchError with OK would be a bug, reported as one
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class FailingClient:
    """Stands in for a server's client and fails every search with `code`."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.UNKNOWN

    async def search(self, *args: Any, **kwargs: Any) -> Any:
        raise error_for(self.code, f"failed with {self.code.name}")


def test_every_grpc_status_maps_through_the_one_table(monkeypatch: pytest.MonkeyPatch) -> None:
    failing = FailingClient()
    monkeypatch.setattr("clipsearch.web.backends.AsyncClient", lambda *a, **k: failing)
    config = WebConfig(servers=("127.0.0.1:9",))
    with WebServer(config) as web, httpx.Client(base_url=web.url) as http:
        seen = {}
        for code in grpc.StatusCode:
            failing.code = code
            response = http.post("/api/search", json={"text": "x"})
            status, name = error_of(response)
            assert name == code.name
            assert response.json()["error"]["message"] == f"failed with {code.name}"
            seen[code.name] = status
    assert seen == EXPECTED_HTTP


def test_a_server_that_is_down_too_slow_or_locked_maps_to_503_504_401(tmp_path: Path) -> None:
    # A listening socket that never answers: the call can only run out of time (with a locked
    # server and a tiny deadline, which of auth and the deadline answers first is a race).
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    slow = f"127.0.0.1:{silent.getsockname()[1]}"
    with (
        silent,
        ThreadedServer(
            quick_settings(tmp_path / "t.db", auth_token="s3cret"), fake_components()
        ) as locked,
    ):
        cases = [
            (WebConfig(servers=("127.0.0.1:1",), timeout=5), (503, "UNAVAILABLE")),
            (WebConfig(servers=(slow,), timeout=0.5), (504, "DEADLINE_EXCEEDED")),
            (WebConfig(servers=(locked.address,)), (401, "UNAUTHENTICATED")),
            (WebConfig(servers=(locked.address,), token="wrong"), (401, "UNAUTHENTICATED")),
        ]
        for config, expected in cases:
            with WebServer(config) as web, httpx.Client(base_url=web.url, timeout=30) as http:
                assert error_of(http.post("/api/search", json={"text": "x"})) == expected
        right = WebConfig(servers=(locked.address,), token="s3cret")
        with WebServer(right) as web, httpx.Client(base_url=web.url, timeout=30) as http:
            assert error_of(http.post("/api/search", json={"text": "x", "collection": "c"})) == (
                404,
                "NOT_FOUND",
            )


# --- thumbnails and the media root -------------------------------------------------------------


class CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012  (one list per test run, read by the test)

    def do_GET(self) -> None:
        CountingHandler.requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(png((5, 5, 5)))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def remote() -> Iterator[str]:
    """A real HTTP server on loopback that records every request it gets."""
    CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/image.png"
    server.shutdown()
    server.server_close()


def test_thumbnails_are_resized_and_cached(site: Site) -> None:
    cache: ThumbnailCache = site.web.app.state.web.thumbnails
    hits_before = cache.hits
    for uri in ("shapes/red-1.png", str(site.media / "shapes" / "red-0.png")):
        for size, expected in ((128, 128), (512, 300)):  # never enlarged past the 300 px source
            response = site.http.get("/api/thumbnail", params={"uri": uri, "size": size})
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/jpeg"
            image = Image.open(io.BytesIO(response.content))
            assert image.size == (expected, expected)
            assert image.getpixel((expected // 2, expected // 2))[0] > 200  # the red
    again = site.http.get("/api/thumbnail", params={"uri": "shapes/red-1.png", "size": 128})
    assert again.status_code == 200
    assert cache.hits == hits_before + 1


def test_the_media_root_refuses_every_way_out_and_fetches_nothing(site: Site, remote: str) -> None:
    secret = site.outside / "secret.png"
    refused = {
        "../outside/secret.png": 403,
        "shapes/../../outside/secret.png": 403,
        str(secret): 403,
        "/etc/passwd": 403,
        "link.png": 403,  # a symlink inside that points out
        "escape/secret.png": 403,  # a linked folder that points out
        "../nothing-here.png": 403,
        "file://" + str(secret): 403,
        "file:" + str(secret): 403,
        remote: 403,
        "https://127.0.0.1:1/x.png": 403,
        "shapes/none.png": 404,
        "shapes": 404,  # a folder is not an image
        "%2e%2e/outside/secret.png": 404,  # a literal name after the one decoding: not there
        "shapes/red-0.png\x00.txt": 400,
    }
    for uri, status in refused.items():
        response = site.http.get("/api/thumbnail", params={"uri": uri})
        assert response.status_code == status, (uri, response.text)
    # Percent-encoding in the raw URL is decoded once, then refused like the plain path.
    raw = site.http.get("/api/thumbnail?uri=%2e%2e%2foutside%2fsecret.png")
    assert error_of(raw) == (403, "PERMISSION_DENIED")
    raw = site.http.get("/api/thumbnail?uri=..%2F..%2F..%2F..%2Fetc%2Fpasswd")
    assert error_of(raw) == (403, "PERMISSION_DENIED")
    assert error_of(site.http.get("/api/thumbnail", params={"uri": "link.png", "size": 1000})) == (
        400,
        "INVALID_ARGUMENT",
    )
    assert CountingHandler.requests == []


def test_without_a_media_root_there_are_no_thumbnails(site: Site) -> None:
    config = WebConfig(servers=site.web.app.state.web.backends.config.servers)
    with WebServer(config) as web, httpx.Client(base_url=web.url, timeout=30) as http:
        assert error_of(http.get("/api/thumbnail", params={"uri": "shapes/red-0.png"})) == (
            404,
            "NOT_FOUND",
        )
        body = http.post("/api/search", json={"text": "red", "collection": "shapes"}).json()
        assert len(body["hits"]) == 10 and {h["thumbnail"] for h in body["hits"]} == {None}
        assert http.get("/api/info").json()["thumbnails"] is False


def test_the_thumbnail_cache_is_bounded_least_recently_used_first(site: Site) -> None:
    one = make_thumbnail(site.media / "shapes" / "red-0.png", 64)
    cache = ThumbnailCache(MediaRoot(site.media), max_bytes=len(one.data) * 5 // 2)  # two such fit
    cache.get("shapes/red-0.png", 64)
    cache.get("shapes/red-1.png", 64)
    assert len(cache) == 2
    cache.get("shapes/red-0.png", 64)  # red-0 is now the most recently used
    cache.get("shapes/red-2.png", 64)  # evicts red-1
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    misses = cache.misses
    cache.get("shapes/red-0.png", 64)
    assert cache.misses == misses
    cache.get("shapes/red-1.png", 64)
    assert cache.misses == misses + 1


# --- OpenAI-compatible embeddings -------------------------------------------------------------


def test_embeddings_have_openais_exact_shape(site: Site) -> None:
    served = site.grpc.info()
    response = site.http.post(
        "/v1/embeddings", json={"input": ["a red circle", "红色的圆形"], "model": served.model_name}
    )
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["object", "data", "model", "usage"]
    assert body["object"] == "list" and body["model"] == served.model_name
    assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert [list(item) for item in body["data"]] == [["object", "index", "embedding"]] * 2
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    expected = site.grpc.encode_texts(["a red circle", "红色的圆形"]).vectors
    np.testing.assert_array_equal(
        np.array([d["embedding"] for d in body["data"]], dtype=np.float32), expected
    )
    single = site.http.post("/v1/embeddings", json={"input": "a red circle"}).json()
    assert len(single["data"]) == 1
    assert single["data"][0]["embedding"] == body["data"][0]["embedding"]


def test_embeddings_in_base64_decode_to_the_float_vectors(site: Site) -> None:
    body = site.http.post(
        "/v1/embeddings", json={"input": ["a blue square"], "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, site.grpc.encode_texts(["a blue square"]).vectors[0])


def test_embeddings_of_images_as_infinity_sends_them(site: Site) -> None:
    red, blue = png((220, 30, 30), 40), png((30, 60, 220), 40)
    expected = site.grpc.encode_images([red, blue]).vectors
    text = site.grpc.encode_texts(["a red circle"]).vectors[0]
    for body in (
        {"input": [base64.b64encode(red).decode(), data_uri(blue)], "modality": "image"},
        {"input": [data_uri(red), data_uri(blue)]},  # data URIs are images without modality
    ):
        out = site.http.post("/v1/embeddings", json=body).json()
        got = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
    mixed = site.http.post(
        "/v1/embeddings", json={"input": [data_uri(red), "a red circle", data_uri(blue)]}
    ).json()
    got = np.array([d["embedding"] for d in mixed["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, np.stack([expected[0], text, expected[1]]))
    assert [d["index"] for d in mixed["data"]] == [0, 1, 2]


def test_embedding_errors(site: Site, remote: str) -> None:
    dim = site.grpc.info().dim
    cases = [
        ({"input": []}, (400, "INVALID_ARGUMENT")),
        ({"input": [""]}, (400, "INVALID_ARGUMENT")),
        ({"input": [[1, 2, 3]]}, (400, "INVALID_ARGUMENT")),  # token arrays: no tokenizer here
        ({"input": "x", "encoding_format": "int8"}, (400, "INVALID_ARGUMENT")),
        ({"input": "x", "dimensions": dim + 1}, (400, "INVALID_ARGUMENT")),
        ({"input": "x", "model": "text-embedding-3-small"}, (404, "NOT_FOUND")),
        ({"input": [remote], "modality": "image"}, (403, "PERMISSION_DENIED")),
        ({"input": ["aGVsbG8="], "modality": "image"}, (400, "INVALID_ARGUMENT")),
        ({"inputs": ["x"]}, (400, "INVALID_ARGUMENT")),
    ]
    for body, expected in cases:
        assert error_of(site.http.post("/v1/embeddings", json=body)) == expected, body
    assert (
        site.http.post("/v1/embeddings", json={"input": "x", "dimensions": dim}).status_code == 200
    )
    assert CountingHandler.requests == []


def test_models_lists_the_served_model_once(site: Site) -> None:
    body = site.http.get("/v1/models").json()
    assert body == {
        "object": "list",
        "data": [
            {
                "id": site.grpc.info().model_name,
                "object": "model",
                "created": 0,
                "owned_by": "clipsearch",
            }
        ],
    }


# --- the command line -------------------------------------------------------------------------


def test_clipsearch_web_serves_until_interrupted(site: Site, tmp_path: Path) -> None:
    address = site.web.app.state.web.backends.config.servers[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "clipsearch", "web", "--server", address, "--port", "0",
         "--media-root", str(site.media)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        assert line.startswith("clipsearch web on http://127.0.0.1:"), line
        url = line.split()[3]
        with httpx.Client(base_url=url, timeout=30) as http:
            body = http.post("/api/search", json={"text": "red", "collection": "few"}).json()
            assert len(body["hits"]) == 5
            assert http.get(body["hits"][0]["thumbnail"]).status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_clipsearch_web_refuses_a_missing_media_root(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "clipsearch", "web", "--media-root", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == f"clipsearch web: --media-root {tmp_path / 'none'} is not a directory\n"
    helped = subprocess.run(
        [sys.executable, "-m", "clipsearch", "web", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert helped.returncode == 0
    for option in ("--server HOST:PORT", "--token", "--timeout", "--host", "--port",
                   "--media-root DIR", "--extra-server HOST:PORT"):  # fmt: skip
        assert option in helped.stdout
