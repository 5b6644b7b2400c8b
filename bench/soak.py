"""`clipsearch bench soak --seconds N`: mixed load at saturation, and a leak check.

Starts `clipsearch serve` as a child process (the demo model, Milvus Lite in a temp dir),
ingests a small gallery, then `--clients` threads call it back to back on loopback: text
searches (60%), Encode of texts and an image (20%) and ingest streams of 8 items (20%,
upserts over the gallery's own 512 ids, written before the load starts, so the data does not
grow). After `--warmup-seconds` the server's RSS, threads and open files are taken as the
baseline; at the end of `--seconds` again, with the same clients still connected, sampling
every 2 s in between. Errors are counted by status code, latencies by call.

RSS moves by +-5% from one sample to the next under this load (allocator arenas, Milvus
Lite's memtable and compactions), so its growth is the mean of the last quarter of the
samples over the mean of the first quarter. Exit code 1 if it grew more than 10%, threads
by more than THREAD_SLACK or open files by more than FILE_SLACK (a leak grows with time; a
pool that starts one more worker does not), or any call failed other than
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from clipsearch.bench.faults import ChildServer, make_items
from clipsearch.client import Client, ClipsearchError, IngestItem

COLLECTION = "soak"
QUERIES = ("a red circle", "红色的圆形", "blue square", "a yellow star", "绿色的三角形", "purple")
ID_SPACE = 512
INGEST_BATCH = 8
RSS_GROWTH_LIMIT = 0.10
THREAD_SLACK = 2
FILE_SLACK = 4
SAMPLE_EVERY_S = 2.0


def process_stats(pid: int) -> dict[str, int]:
    """RSS (KiB), threads and open files of process `pid`, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return {
        "rss_kib": fields["VmRSS"],
        "threads": fields["Threads"],
        "open_files": sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Load:
    """`clients` threads calling the server back to back until `stop()`."""

    def __init__(self, address: str, clients: int, items: list[IngestItem]) -> None:
        self.address = address
        self.items = items
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(n,), name=f"soak-{n}", daemon=True)
            for n in range(clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def reset(self) -> None:
        with self._lock:
            self.latencies.clear()
            self.errors.clear()

    def _loop(self, worker: int) -> None:
        with Client(self.address, timeout=60) as client:
            i = worker
            while not self._stop.is_set():
                kind = ("search", "search", "search", "encode", "ingest")[i % 5]
                started = time.perf_counter()
                try:
                    self._call(client, kind, i)
                except ClipsearchError as exc:
                    with self._lock:
                        self.errors[exc.code.name] += 1
                    continue
                finally:
                    i += 1
                elapsed_ms = (time.perf_counter() - started) * 1000
                with self._lock:
                    self.latencies[kind].append(elapsed_ms)

    def _call(self, client: Client, kind: str, i: int) -> None:
        if kind == "search":
            client.search(QUERIES[i % len(QUERIES)], collection=COLLECTION, top_k=10)
        elif kind == "encode":
            client.encode_texts([QUERIES[i % len(QUERIES)], QUERIES[(i + 1) % len(QUERIES)]])
            client.encode_images([self.items[i % len(self.items)].image or b""])
        else:
            start = (i * INGEST_BATCH) % ID_SPACE
            batch = [self.items[(start + k) % len(self.items)] for k in range(INGEST_BATCH)]
            summary = client.ingest(
                [
                    IngestItem(
                        id=f"soak-{(start + k) % ID_SPACE:05d}",
                        image=item.image,
                        caption=item.caption,
                    )
                    for k, item in enumerate(batch)
                ],
                collection=COLLECTION,
                max_attempts=1,
            ).run()
            if summary.failed:
                with self._lock:
                    self.errors["ingest item FAILED"] += summary.failed

    def report(self) -> dict[str, Any]:
        with self._lock:
            calls = {
                kind: {
                    "calls": len(values),
                    "p50_ms": round(statistics.median(values), 2) if values else 0.0,
                    "p99_ms": round(percentile(values, 0.99), 2),
                }
                for kind, values in sorted(self.latencies.items())
            }
            return {"calls": calls, "errors": dict(self.errors)}


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="clipsearch-soak-"))
    server_args = ["--log-level", "warning", "--milvus-uri", str(work / "soak.db")]
    items = make_items(ID_SPACE, seed=3)
    server = ChildServer(server_args)
    server.start()
    try:
        pid = server.pid
        gallery = [
            IngestItem(id=f"soak-{k:05d}", image=item.image, caption=item.caption)
            for k, item in enumerate(items)
        ]
        with Client(server.address, timeout=120) as client:
            client.ingest(gallery, collection=COLLECTION).run()
        load = Load(server.address, args.clients, items)
        load.start()
        time.sleep(args.warmup_seconds)
        load.reset()
        baseline = process_stats(pid)
        samples = [baseline]
        deadline = time.monotonic() + args.seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(SAMPLE_EVERY_S, left))
            samples.append(process_stats(pid))
        end = samples[-1]
        report = load.report()
        load.stop()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    quarter = max(1, len(samples) // 4)
    rss_first = statistics.mean(s["rss_kib"] for s in samples[:quarter])
    rss_last = statistics.mean(s["rss_kib"] for s in samples[-quarter:])
    rss_growth = rss_last / rss_first - 1
    serious = {code: n for code, n in report["errors"].items() if code != "RESOURCE_EXHAUSTED"}
    problems = []
    if rss_growth > RSS_GROWTH_LIMIT:
        problems.append(f"RSS grew {rss_growth:.1%} after the warm-up (quarter means)")
    if end["threads"] > baseline["threads"] + THREAD_SLACK:
        problems.append(f"threads {baseline['threads']} -> {end['threads']}")
    if end["open_files"] > baseline["open_files"] + FILE_SLACK:
        problems.append(f"open files {baseline['open_files']} -> {end['open_files']}")
    if serious:
        problems.append(f"errors {serious}")
    result = {
        "seconds": args.seconds,
        "warmup_seconds": args.warmup_seconds,
        "clients": args.clients,
        "cpus": os.cpu_count(),
        **report,
        "server_at_start": baseline,
        "server_at_end": end,
        "rss_max_kib": max(s["rss_kib"] for s in samples),
        "rss_first_quarter_mib": round(rss_first / 1024, 1),
        "rss_last_quarter_mib": round(rss_last / 1024, 1),
        "rss_mib_samples": [s["rss_kib"] // 1024 for s in samples],
        "rss_growth": round(rss_growth, 4),
        "problems": problems,
    }
    for kind, row in result["calls"].items():
        print(
            f"  {kind:<7} {row['calls']:7d} calls  p50 {row['p50_ms']:7.2f} ms  "
            f"p99 {row['p99_ms']:7.2f} ms",
            file=sys.stderr,
        )
    print(
        f"  errors {report['errors'] or 'none'}; server RSS {baseline['rss_kib'] // 1024} -> "
        f"{end['rss_kib'] // 1024} MiB (first quarter {rss_first / 1024:.0f}, last quarter "
        f"{rss_last / 1024:.0f}: {rss_growth:+.1%}), threads {baseline['threads']} -> "
        f"{end['threads']}, open files {baseline['open_files']} -> {end['open_files']}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    if problems:
        print("soak FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("soak passed", file=sys.stderr)
    return 0
