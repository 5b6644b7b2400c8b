"""`clipsearch bench ingest` end to end on a tiny gallery: a real `clipsearch serve` on Milvus
Lite and on a real Milvus server, and the keys its JSON promises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clipsearch.bench.cpu import measure_cpu, process_tree
from clipsearch.bench.ingest import RESULT_KEYS, demo_items, run
from clipsearch.cli import main


def test_demo_items_are_deterministic_with_captions_and_metadata() -> None:
    first, again = demo_items(3), demo_items(3)
    assert [i.id for i in first] == ["bench-11-0000000", "bench-11-0000001", "bench-11-0000002"]
    assert first == again
    assert all(i.image[:2] == b"\xff\xd8" and i.caption and i.metadata["shape"] for i in first)


BUSY_CHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
end = time.process_time() + 0.4
while time.process_time() < end:
    pass
print(grandchild.pid, flush=True)
time.sleep(60)
"""


def test_cpu_split_counts_the_cpu_a_process_tree_used_during_the_work() -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY_CHILD], stdout=subprocess.PIPE, text=True)
    out = child.stdout
    assert out is not None
    lines: list[str] = []
    try:
        split = measure_cpu(4, child.pid, None, lambda: lines.append(out.readline()))
        assert int(lines[0]) in process_tree(child.pid)  # descendants belong to the tree
    finally:
        for pid in process_tree(child.pid)[1:]:
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()
    assert split is not None
    assert split.server_ms >= 0.3 * 1000 / 4  # the child's busy 0.4 s, per item
    assert split.store_ms == 0 and split.client_ms < split.server_ms
    assert split.cores > 0


@pytest.mark.slow
def test_bench_ingest_measures_both_stores_on_64_items(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run(64, tmp_path, log=lines.append)
    assert set(RESULT_KEYS) <= set(report)
    assert report["items"] == 64
    for key in RESULT_KEYS:
        if key.endswith("_items_per_s"):
            assert report[key] > 0, key
    assert report["ingest_vs_encoder_lite"] == pytest.approx(
        report["ingest_lite_items_per_s"] / report["encoder_items_per_s"], abs=0.01
    )
    assert report["ingest_vs_encoder_server"] == pytest.approx(
        report["ingest_server_items_per_s"] / report["encoder_beside_server_items_per_s"], abs=0.01
    )
    assert report["ingest_vs_encoder_memory"] == pytest.approx(
        report["ingest_memory_items_per_s"] / report["encoder_memory_items_per_s"], abs=0.01
    )
    for store in ("memory", "lite", "server"):
        assert report[store]["ok"] == 64 and report[store]["failed"] == 0
        assert report[store]["mean_store_us"] > 0
    cpu = report["cpu"]
    stores = ("memory", "lite", "server")
    assert set(cpu) == {f"{phase}_{store}" for phase in ("encoder", "ingest") for store in stores}
    assert all(cpu[phase]["server_ms"] > 0 and cpu[phase]["cores"] > 0 for phase in cpu)
    assert cpu["ingest_server"]["store_ms"] > 0  # the Milvus server's own processes
    assert cpu["ingest_lite"]["store_ms"] == 0  # Lite runs inside the server's tree
    assert any("raw pymilvus upserts into Milvus Lite" in line for line in lines)


@pytest.mark.slow
def test_bench_ingest_cli_prints_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "ingest", "--count", "8", "--no-server", "--json"]
    assert main([*argv, "--serve-arg=--intra-op-threads=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 8
    assert report["serve_args"] == ["--intra-op-threads=1"]
    assert report["ingest_lite_items_per_s"] > 0 and report["ingest_server_items_per_s"] is None
    assert report["ingest_vs_encoder_server"] is None and report["ingest_vs_encoder_lite"] > 0
