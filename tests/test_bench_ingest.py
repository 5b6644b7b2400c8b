"""`clipsearch bench ingest` end to end on a tiny gallery: a real `clipsearch serve` on Milvus
Lite and on a real Milvus server, and the keys its JSON promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipsearch.bench.ingest import RESULT_KEYS, demo_items, run
from clipsearch.cli import main


def test_demo_items_are_deterministic_with_captions_and_metadata() -> None:
    first, again = demo_items(3), demo_items(3)
    assert [i.id for i in first] == ["bench-11-0000000", "bench-11-0000001", "bench-11-0000002"]
    assert first == again
    assert all(i.image[:2] == b"\xff\xd8" and i.caption and i.metadata["shape"] for i in first)


@pytest.mark.slow
def test_bench_ingest_measures_both_stores_on_64_items(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run(64, tmp_path, log=lines.append)
    assert set(RESULT_KEYS) <= set(report)
    assert report["items"] == 64
    for key in RESULT_KEYS[1:7]:
        assert report[key] > 0, key
    assert report["ingest_vs_encoder_lite"] == pytest.approx(
        report["ingest_lite_items_per_s"] / report["encoder_items_per_s"], abs=0.01
    )
    assert report["ingest_vs_encoder_server"] == pytest.approx(
        report["ingest_server_items_per_s"] / report["encoder_beside_server_items_per_s"], abs=0.01
    )
    for store in ("lite", "server"):
        assert report[store]["ok"] == 64 and report[store]["failed"] == 0
        assert report[store]["mean_store_us"] > 0
    assert any("raw pymilvus upserts into Milvus Lite" in line for line in lines)


@pytest.mark.slow
def test_bench_ingest_cli_prints_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ingest", "--count", "8", "--no-server", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 8
    assert report["ingest_lite_items_per_s"] > 0 and report["ingest_server_items_per_s"] is None
    assert report["ingest_vs_encoder_server"] is None and report["ingest_vs_encoder_lite"] > 0
