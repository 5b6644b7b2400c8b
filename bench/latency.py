"""`clipsearch bench latency`: search latency and throughput of a real server process.

Starts `clipsearch serve` (the demo model unless --model, Milvus Lite in a temp dir unless
--milvus-uri), ingests a generated gallery, then asks text searches from 1, 8 and 32 client
threads for a fixed time each and reports the round trip percentiles, queries/s, and the
server's own breakdown (queue, preprocess, inference, search) from the replies' Timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from clipsearch.client import Client
from clipsearch.export.demo_data import generate_gallery
from clipsearch.server.process import ServerProcess

QUERIES = ("a red circle", "红色的圆形", "blue square", "a yellow star", "绿色的三角形", "purple")
COLLECTION = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_clients(address: str, threads: int, seconds: float) -> dict[str, float]:
    samples: list[tuple[float, Any]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(offset: int) -> None:
        with Client(address, timeout=30) as client:
            i = offset
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                result = client.search(QUERIES[i % len(QUERIES)], collection=COLLECTION, top_k=10)
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    samples.append((elapsed, result.timing))
                i += 1

    began = time.monotonic()
    workers = [threading.Thread(target=client_loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.monotonic() - began
    round_trips = [s[0] for s in samples]
    timings = [s[1] for s in samples]
    return {
        "threads": threads,
        "queries": len(samples),
        "qps": len(samples) / wall,
        "p50_ms": statistics.median(round_trips),
        "p99_ms": percentile(round_trips, 0.99),
        "server_ms": statistics.median(t.total_ms for t in timings),
        "queue_ms": statistics.median(t.queue_ms for t in timings),
        "preprocess_ms": statistics.median(t.preprocess_ms for t in timings),
        "inference_ms": statistics.median(t.inference_ms for t in timings),
        "search_ms": statistics.median(t.search_ms for t in timings),
        "batch_size": statistics.median(t.batch_size for t in timings),
    }


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="clipsearch-bench-"))
    generate_gallery(work / "gallery", args.n, seed=5)
    server_args = ["--log-level", "warning", "--milvus-uri", args.milvus_uri or str(work / "b.db")]
    if args.model:
        server_args += ["--model", args.model]
    rows = []
    with ServerProcess(server_args) as server, Client(server.address, timeout=120) as client:
        summary = client.ingest_path(
            work / "gallery" / "manifest.csv",
            caption_field="caption_en",
            collection=COLLECTION,
            progress=False,
        )
        if summary.failed:
            print(f"bench: ingest failed: {summary.errors[:3]}", file=sys.stderr)
            return 1
        time.sleep(1.5)  # let Milvus Lite flush its memtable, as a long-running server would
        run_clients(server.address, 1, 1.0)  # warm
        for threads in args.threads:
            row = run_clients(server.address, threads, args.seconds)
            rows.append(row)
            print(
                f"  c{threads:<3} {row['qps']:7.1f} q/s  p50 {row['p50_ms']:6.2f} ms  "
                f"p99 {row['p99_ms']:6.2f} ms  server {row['server_ms']:5.2f} (queue "
                f"{row['queue_ms']:.2f}, inference {row['inference_ms']:.2f}, search "
                f"{row['search_ms']:.2f}, batch {row['batch_size']:.0f})",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps({"gallery": args.n, "rows": rows}, indent=2))
    return 0
