"""`clipsearch bench search`: exact ground truth and recall, and a tiny run end to end on
Milvus Lite and a real Milvus server through a real `clipsearch serve`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from store_fixtures import MilvusServerProcess

from clipsearch.bench import search_data as data
from clipsearch.bench.search import RUN_KEYS, SEARCH_KEYS, SearchBenchConfig, parse_rows, run
from clipsearch.cli import main


def test_exact_top_k_matches_a_full_sort_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "GROUND_TRUTH_CHUNK", 37)  # many chunks, a ragged last one
    rows, queries = data.random_vectors(500, 16, 1), data.random_vectors(9, 16, 2)
    expected = np.argsort(-(queries @ rows.T), axis=1)[:, : data.TOP_K]
    assert np.array_equal(data.exact_top_k(rows, queries), expected)


def test_recall_counts_the_exact_neighbours_found() -> None:
    truth = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert data.recall_at_k([[0, 1, 2, 3], [4, 5, 6, 7]], truth) == 1.0
    assert data.recall_at_k([[3, 2, 9, 9], [7, 8, 9, 10]], truth) == 3 / 8


def test_demo_rows_keep_their_scene_and_embedding_keeps_inner_products() -> None:
    base = data.random_vectors(4, 32, 3)
    rows = data.perturbed_rows(base, 40, seed=4)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    nearest_scene = np.argmax(rows @ base.T, axis=1)
    assert np.array_equal(nearest_scene, np.arange(40) % 4)
    wide = data.embed(rows, 128, seed=5)
    assert wide.shape == (40, 128)
    assert np.allclose(wide @ wide.T, rows @ rows.T, atol=1e-5)


def test_the_commands_index_choices_are_the_servers() -> None:
    from clipsearch.bench import commands
    from clipsearch.server.limits import INDEX_TYPES
    from clipsearch.server.store.indexing import IndexConfig

    assert commands.INDEX_TYPES == INDEX_TYPES
    assert IndexConfig().index_type == commands.DEFAULT_INDEX_TYPE


def test_rows_parse_as_a_comma_list_or_repeated() -> None:
    assert parse_rows(["100_000,1000000", "2000"]) == (100_000, 1_000_000, 2000)
    with pytest.raises(ValueError, match="positive"):
        parse_rows(["0"])


@pytest.mark.slow
def test_flat_index_on_lite_and_server_is_exact(
    tmp_path: Path, milvus_server: MilvusServerProcess
) -> None:
    config = SearchBenchConfig(
        rows=(2000,), dim=128, queries=20, index_type="FLAT", stores=("lite", "server")
    )
    report = run(config, tmp_path, lambda _: None, milvus_server=milvus_server)
    assert [(r["store"], r["rows"]) for r in report["runs"]] == [("lite", 2000), ("server", 2000)]
    for figures in report["runs"]:
        assert set(figures) == set(RUN_KEYS)
        assert figures["rows_inserted"] == figures["count"] == 2000
        assert figures["clipsearch_error"] is None
        for key in ("insert_s", "insert_rows_per_s", "index_build_s", "serve_start_s"):
            assert figures[key] > 0, key
        assert figures["flush_s"] >= 0 and figures["load_s"] >= 0
        for path in ("pymilvus", "clipsearch"):
            assert set(figures[path]) == set(SEARCH_KEYS)
            assert 0 < figures[path]["p50_ms"] <= figures[path]["p99_ms"]
            assert figures[path]["recall_at_10"] == 1.0, (figures["store"], path)
        assert figures["memory"]["serve"]["rss_mib"] > 50
    assert report["runs"][1]["memory"]["milvus_server"]["rss_mib"] > 50
    assert milvus_server.pid is not None  # the shared server is left running, its data dropped


@pytest.mark.slow
def test_cli_prints_json_with_hnsw_recall(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "search", "--rows", "1500", "--dim", "128", "--queries", "10"]
    assert main([*argv, "--stores", "lite", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["index_type"] == "HNSW" and report["config"]["rows"] == [1500]
    (figures,) = report["runs"]
    assert figures["store"] == "lite" and figures["count"] == 1500
    assert "milvus_server" not in figures["memory"]
    for path in ("pymilvus", "clipsearch"):
        assert 0.5 <= figures[path]["recall_at_10"] <= 1.0
