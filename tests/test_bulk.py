"""`clipsearch bulk` end to end: a generated gallery encoded by Ray actors (one local Ray
instance for the module, 2 CPUs) into a real Milvus server and into Milvus Lite, then
searched through a real clipsearch server next to the same gallery ingested over gRPC.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from pymilvus import MilvusClient
from server_fixtures import ThreadedServer, quick_settings
from store_fixtures import MilvusServerProcess

from clipsearch.bulk.run import connect
from clipsearch.cli import main
from clipsearch.client import Client
from clipsearch.client.sources import open_source
from clipsearch.export.demo_data import GalleryItem, generate_gallery
from clipsearch.server.ingest import content_id

N = 60
BROKEN = "broken-1"
QUERIES = (("a red circle", "red", "circle"), ("blue square", "blue", "square"))


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    import ray

    with pytest.MonkeyPatch.context() as env:
        # What the server below uses, set the way an operator would: CLIPSEARCH_* variables.
        env.setenv("CLIPSEARCH_INDEX_TYPE", "FLAT")
        env.setenv("CLIPSEARCH_PRECISION", "fp32")
        connect(num_cpus=2)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, GalleryItem]]:
    """N scenes and manifest.csv, plus `with-broken.csv`: the same rows and one more whose
    file is not an image."""
    root = tmp_path_factory.mktemp("bulk-gallery")
    items = generate_gallery(root, N, seed=21)
    (root / "images" / "broken.jpg").write_bytes(b"this is not a JPEG")
    manifest = (root / "manifest.csv").read_text(encoding="utf-8")
    extra = f"{BROKEN},images/broken.jpg,a broken file,,circle,red,,,1,dark,64,64\n"
    (root / "with-broken.csv").write_text(manifest + extra, encoding="utf-8")
    return root, {item.id: item for item in items}


def test_the_server_never_imports_ray_and_bulk_help_imports_no_extra() -> None:
    code = (
        "import contextlib, io, sys\n"
        "from clipsearch.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['bulk', '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0\n"
        "assert '--num-gpus-per-actor' in out.getvalue()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'onnxruntime')))\n"
        "import clipsearch.server.app, clipsearch.server.commands, clipsearch.demo.run\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.splitlines() == ["[]", "[]"]


def test_bulk_refuses_a_run_without_exactly_one_destination(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["bulk", str(tmp_path), "--collection", "c"])
    assert code == 2
    assert "exactly one destination" in capsys.readouterr().err


def bulk(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """Run `clipsearch bulk ... --json` in this process (on the module's Ray instance):
    exit code, summary (empty when the run did not start), stderr."""
    capsys.readouterr()
    code = main(["bulk", *args, "--json", "--quiet", "--actors", "2", "--batch-size", "16"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines else {}, err


def shows(item: GalleryItem, colour: str, shape: str) -> bool:
    return (colour, shape) in {(item.colour, item.shape), (item.colour2, item.shape2)}


def search_ids(client: Client, collection: str, query: str, target: str = "image") -> list[str]:
    hits = client.search(query, collection=collection, top_k=8, target=target).hits  # type: ignore[arg-type]
    return [hit.id for hit in hits]


def caption_hits(client: Client, collection: str, query: str) -> list[tuple[str, float]]:
    hits = client.search(query, collection=collection, top_k=12, target="caption").hits
    return [(hit.id, hit.score) for hit in hits]


def same_ranking(mine: list[tuple[str, float]], theirs: list[tuple[str, float]]) -> bool:
    """Equal scores, and the same ids at each score: many gallery items share a caption, so
    ties come back in storage order. The last score's ids may be cut off at top_k."""
    np.testing.assert_allclose([s for _, s in mine], [s for _, s in theirs], atol=1e-5)

    def by_score(hits: list[tuple[str, float]]) -> list[set[str]]:
        groups: dict[float, set[str]] = {}
        for hit_id, score in hits:
            groups.setdefault(round(score, 4), set()).add(hit_id)
        return list(groups.values())[:-1]

    return by_score(mine) == by_score(theirs)


@pytest.mark.slow  # a Ray instance and a Milvus server (~30 s to start)
def test_bulk_into_a_milvus_server_is_searched_like_ingest_reruns_converge_and_resumes(
    ray_instance: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    milvus_server: MilvusServerProcess,
    gallery: tuple[Path, dict[str, GalleryItem]],
) -> None:
    root, items = gallery
    source = str(root / "with-broken.csv")
    args = [source, "--caption-field", "caption_en", "--collection", "bulk"]
    args += ["--milvus-uri", milvus_server.uri]

    code, summary, _ = bulk(capsys, *args, "--create")
    assert code == 1  # one item failed
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (N, 1, 0)
    [error] = summary["errors"]
    assert error["id"] == BROKEN
    assert "not an image" in error["error"]

    settings = quick_settings(tmp_path / "unused.db", milvus_uri=milvus_server.uri)
    with ThreadedServer(settings) as server, Client(server.address) as client:
        assert client.count(collection="bulk") == N
        ingested = client.ingest(
            open_source(root / "manifest.csv", caption_field="caption_en"), collection="ingested"
        ).run()
        assert ingested.ok == N
        for query, colour, shape in QUERIES:
            found = search_ids(client, "bulk", query)
            assert shows(items[found[0]], colour, shape), found
            assert found == search_ids(client, "ingested", query)
            assert same_ranking(
                caption_hits(client, "bulk", query), caption_hits(client, "ingested", query)
            )
        some = sorted(items)[:10]
        by_bulk = client.get(some, include_vectors=True, collection="bulk")
        by_ingest = client.get(some, include_vectors=True, collection="ingested")
        assert [i.id for i in by_bulk] == some
        for mine, theirs in zip(by_bulk, by_ingest, strict=True):
            assert (mine.uri, mine.caption, mine.metadata) == (
                theirs.uri,
                theirs.caption,
                theirs.metadata,
            )
            assert mine.image_vector is not None and theirs.image_vector is not None
            assert mine.caption_vector is not None and theirs.caption_vector is not None
            np.testing.assert_allclose(mine.image_vector, theirs.image_vector, atol=1e-5)
            np.testing.assert_allclose(mine.caption_vector, theirs.caption_vector, atol=1e-5)

        # A rerun (after a failure, say) upserts the same ids: still one row per item.
        code, again, _ = bulk(capsys, *args)
        assert (again["ok"], again["failed"]) == (N, 1)
        assert client.count(collection="bulk") == N
        milvus = MilvusClient(milvus_server.uri)
        try:
            companion = milvus.query(
                "bulk__captions", output_fields=["count(*)"], consistency_level="Strong"
            )
            assert companion[0]["count(*)"] == N
        finally:
            milvus.close()

        # Resuming: only the missing ids are encoded and written.
        gone = sorted(items)[5:12]
        assert client.delete(gone, collection="bulk") == len(gone)
        code, resumed, _ = bulk(capsys, *args, "--skip-existing")
        assert (resumed["ok"], resumed["skipped"], resumed["failed"]) == (len(gone), N - 7, 1)
        assert client.count(collection="bulk") == N
        assert search_ids(client, "bulk", "a red circle") == search_ids(
            client, "ingested", "a red circle"
        )


@pytest.mark.slow  # a Ray instance
def test_bulk_into_milvus_lite_with_content_hash_ids_and_parquet_output(
    ray_instance: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    gallery: tuple[Path, dict[str, GalleryItem]],
) -> None:
    root, items = gallery
    # A JSONL manifest without ids: the ids are the content hashes, as ingest makes them.
    blue_squares = [
        i for i in sorted(items) if items[i].n_objects == 1 and shows(items[i], "blue", "square")
    ]
    chosen = blue_squares[:4] + [i for i in sorted(items) if i not in blue_squares][:8]
    manifest = tmp_path / "no-ids.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"path": str(root / items[i].path), "caption": items[i].caption_en}) + "\n"
            for i in chosen
        ),
        encoding="utf-8",
    )
    hashes = {content_id((root / items[i].path).read_bytes()): i for i in chosen}
    db = tmp_path / "bulk.db"
    args = [str(manifest), "--collection", "lite", "--milvus-uri", str(db)]

    code, summary, err = bulk(capsys, *args)
    assert (code, summary) == (2, {})
    assert "does not exist (pass --create" in err

    code, summary, _ = bulk(capsys, *args, "--create")
    assert code == 0
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (12, 0, 0)
    code, resumed, _ = bulk(capsys, *args, "--skip-existing")
    assert (resumed["ok"], resumed["skipped"]) == (0, 12)

    parquet = tmp_path / "parquet"
    code, written, err = bulk(capsys, *args, "--parquet-out", str(parquet))
    assert (code, written) == (2, {})
    assert "exactly one destination" in err
    shutil.rmtree(parquet, ignore_errors=True)
    code, written, err = bulk(
        capsys, str(manifest), "--collection", "lite", "--parquet-out", str(parquet)
    )
    assert code == 0 and written["ok"] == 12
    images = pq.read_table(parquet / "lite")
    captions = pq.read_table(parquet / "lite__captions")
    assert images.column_names == ["id", "uri", "caption", "metadata", "image_vector"]
    assert captions.column_names == ["id", "uri", "caption", "metadata", "caption_vector"]
    assert sorted(images["id"].to_pylist()) == sorted(hashes)
    assert images.num_rows == captions.num_rows == 12
    assert images["metadata"].to_pylist() == ["{}"] * 12  # JSON strings, as bulk insert takes
    by_id = {row["id"]: row for row in images.to_pylist()}
    assert {i: by_id[i]["uri"] for i in hashes} == {
        i: str((root / items[hashes[i]].path).resolve()) for i in hashes
    }

    with (
        ThreadedServer(quick_settings(db)) as server,
        Client(server.address) as client,
    ):
        assert client.count(collection="lite") == 12
        stored = client.get(list(hashes), include_vectors=True, collection="lite")
        assert {item.id for item in stored} == set(hashes)
        vectors = dict(
            zip(images["id"].to_pylist(), images["image_vector"].to_pylist(), strict=True)
        )
        for item in stored:
            assert item.caption == items[hashes[item.id]].caption_en
            assert item.image_vector is not None
            np.testing.assert_allclose(item.image_vector, vectors[item.id], atol=1e-6)
        found = search_ids(client, "lite", "blue square")
        assert {hashes[i] for i in found[:4]} == set(blue_squares[:4])
