"""Persistence: a real Milvus server process and a real clipsearch server are stopped and
started again on the same data; the collections come back loaded, with exact counts, and
the same searches return the same ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pymilvus import MilvusClient
from server_fixtures import ThreadedServer, quick_settings
from store_fixtures import MilvusServerProcess

from clipsearch.client import Client
from clipsearch.export.demo_data import generate_gallery

pytestmark = pytest.mark.slow  # starts a Milvus server twice (~10 s each, ~30 s to reload)

N = 40
RESTART_TIMEOUT_S = 300.0
QUERIES = ("a red circle", "blue square", "a green triangle", "一个黄色的五角星")


def snapshot(client: Client) -> dict[str, object]:
    """What must survive a restart: collections, counts, and the ids of fixed searches."""
    return {
        "collections": [(c.name, c.count) for c in client.list_collections()],
        "dark": client.count('metadata["background"] == "dark"', collection="photos"),
        "searches": {
            (query, target): [
                hit.id
                for hit in client.search(query, target=target, collection="photos", top_k=10).hits
            ]
            for query in QUERIES
            for target in ("image", "caption", "both")
        },
        "more_like": [
            hit.id for hit in client.search(like="demo-21-000003", collection="photos").hits
        ],
    }


def load_states(uri: str, names: list[str]) -> dict[str, str]:
    milvus = MilvusClient(uri)
    try:
        return {name: milvus.get_load_state(name)["state"].name for name in names}
    finally:
        milvus.close()


def test_collections_survive_restarts_of_clipsearch_and_milvus(
    tmp_path: Path, milvus_server_path: str
) -> None:
    gallery = tmp_path / "gallery"
    generate_gallery(gallery, N, seed=21)
    milvus = MilvusServerProcess(tmp_path / "milvus", milvus_server_path)
    milvus.start()
    try:
        settings = quick_settings(tmp_path / "unused.db", milvus_uri=milvus.uri, index_type="HNSW")
        with ThreadedServer(settings) as server, Client(server.address) as client:
            summary = client.ingest_path(
                gallery / "manifest.csv",
                caption_field="caption_en",
                collection="photos",
                progress=False,
            )
            assert (summary.ok, summary.failed) == (N, 0)
            client.create_collection("empty")
            before = snapshot(client)
            assert before["collections"] == [("empty", 0), ("photos", N)]

            # clipsearch alone restarts on the same Milvus.
            server.restart()
            assert snapshot(client) == before

        # Both stop; Milvus comes back on the same data directory, then clipsearch.
        assert milvus.stop() == 0
        # Recovery (reloading what was loaded) can take 25-30 s, minutes on a loaded machine.
        milvus.start(timeout_s=RESTART_TIMEOUT_S, new_port=True)
        settings = settings.replace(milvus_uri=milvus.uri)  # same data, fresh ports
        with ThreadedServer(settings) as server, Client(server.address) as client:
            names = ["photos", "photos__captions", "empty", "empty__captions"]
            assert load_states(milvus.uri, names) == dict.fromkeys(names, "Loaded")
            assert snapshot(client) == before
            # And it still takes writes: a re-ingest upserts, never duplicates.
            again = client.ingest_path(
                gallery / "manifest.csv",
                caption_field="caption_en",
                collection="photos",
                progress=False,
            )
            assert again.ok == N
            assert client.count(collection="photos") == N
    finally:
        milvus.stop()
