"""`clipsearch bench latency`: search latency and throughput of a real server process.

A preset of `clipsearch bench load`: starts `clipsearch serve` (the demo model unless
--model, Milvus Lite in a temp dir unless --milvus-uri), ingests a generated gallery, then
runs the load engine's closed-loop text-search sweep (1, 8 and 32 concurrent requests by
default) against it and reports its table: queries/s, round-trip percentiles, and the server's
own breakdown (queue, preprocess, inference, search) from the replies' Timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from clipsearch.bench.load import LoadConfig, Step, run_load
from clipsearch.bench.load_report import StepSummary, format_table
from clipsearch.client import Client
from clipsearch.export.demo_data import generate_gallery
from clipsearch.server.process import ServerProcess

COLLECTION = "bench"
WARMUP_S = 1.0


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="clipsearch-bench-"))
    generate_gallery(work / "gallery", args.n, seed=5)
    server_args = ["--log-level", "warning", "--milvus-uri", args.milvus_uri or str(work / "b.db")]
    if args.model:
        server_args += ["--model", args.model]
    with ServerProcess(server_args) as server:
        with Client(server.address, timeout=120) as client:
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
        config = LoadConfig(
            server=server.address,
            mix=(("search-text", 1.0),),
            collection=COLLECTION,
            top_k=10,
            duration_s=args.seconds,
            warmup_s=WARMUP_S,
            progress=False,
        )
        printed: list[StepSummary] = []

        def on_step(step: StepSummary) -> None:
            print(format_table([step], header=not printed), file=sys.stderr, flush=True)
            printed.append(step)

        report = run_load(config, [Step("closed", threads) for threads in args.threads], on_step)
    if args.json:
        print(json.dumps({"gallery": args.n, **report.to_dict()}, indent=2, ensure_ascii=False))
    return 0
