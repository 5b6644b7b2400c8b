"""`clipsearch bench figures`: the service's figures of docs/BENCHMARKS.md, in one run.

Each figure compares things measured side by side in this run, on this machine, with real
`clipsearch serve` processes (the demo model unless --model, Milvus Lite in a temp dir) driven
by the `bench load` engine:

1. served image encoding (one image per request, closed loop at 1…64 concurrent requests)
   vs the raw ONNX Runtime session at its best batch size (goal ≥ 0.85);
2. dynamic batching on (max batch 32) vs off (max batch 1): throughput at concurrency 32,
   and the p50 cost of batching at concurrency 1 (goal ≤ max_wait_ms + 1 ms);
3. text→image search p50 vs encode-text p50 + native pymilvus search p50 on the same
   collection: the service's own overhead (goal ≤ 2 ms);
4. image search p50/p99 while a bulk ingest keeps the encoder busy, with the batchers'
   priority queue on and off (`--no-priority-queue`).

The machine's load average is recorded around every figure: on a shared machine read the
ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import MilvusClient

from clipsearch.bench.load import LoadConfig, Step, run_load
from clipsearch.bench.load_report import StepSummary, format_table
from clipsearch.bench.load_workload import QUERIES, render_jpegs
from clipsearch.client import Client, IngestItem
from clipsearch.export.demo_data import generate_gallery
from clipsearch.server.bundle import default_bundle_path, load_bundle
from clipsearch.server.encoder import EncoderOptions, OnnxEncoder
from clipsearch.server.images import ImagePreprocessor
from clipsearch.server.process import ServerProcess
from clipsearch.server.store import validation
from clipsearch.server.store.indexing import IndexConfig, search_params
from clipsearch.server.store.milvus import IMAGE_VECTOR

COLLECTION = "figures"
ENCODE_SWEEP = (1, 4, 16, 32, 64)
RAW_BATCHES = (1, 8, 32, 64)
GOALS = {"served_vs_raw": 0.85, "search_overhead_ms": 2.0}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Figures:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.model = args.model or str(default_bundle_path())
        self.bundle = load_bundle(self.model)
        self.size = args.image_size or self.bundle.manifest.vision.image_size
        self.results: dict[str, Any] = {
            "model": self.bundle.manifest.name,
            "image_size": self.size,
            "cpus": os.cpu_count(),
            "seconds_per_step": args.seconds,
        }

    # --- helpers -------------------------------------------------------------------------

    def server(self, *extra: str, db: str = "") -> ServerProcess:
        args = ["--log-level", "warning", "--model", self.model, "--precision", "fp32"]
        args += ["--milvus-uri", db or str(self.work / f"s{time.monotonic_ns()}.db")]
        return ServerProcess([*args, *extra])

    def load(
        self, address: str, scenario: str, levels: Sequence[int], collection: str | None = None
    ) -> list[StepSummary]:
        config = LoadConfig(
            server=address,
            mix=((scenario, 1.0),),
            collection=collection,
            duration_s=self.args.seconds,
            warmup_s=1.0,
            image_size=self.size,
            progress=False,
            ceiling=False,
        )
        printed: list[StepSummary] = []

        def on_step(step: StepSummary) -> None:
            log(format_table([step], header=not printed))
            printed.append(step)

        return run_load(config, [Step("closed", level) for level in levels], on_step).steps

    def record(self, name: str, run: Callable[[], dict[str, Any]]) -> None:
        log(f"\n== {name} (load average {load_average()})")
        started, before = time.monotonic(), load_average()
        figure = run()
        figure["load_average"] = [before, load_average()]
        figure["seconds"] = round(time.monotonic() - started, 1)
        self.results[name] = figure
        log(json.dumps(figure, ensure_ascii=False))

    # --- 1 and 2: encoding -----------------------------------------------------------------

    def raw_session(self) -> dict[int, float]:
        """Images/s of the bare ONNX Runtime vision session on ready tensors, per batch."""
        encoder = OnnxEncoder(self.bundle, EncoderOptions(precision="fp32", warmup=False))
        preprocess = ImagePreprocessor.from_bundle(self.bundle)
        pixels = np.stack([preprocess(jpeg) for jpeg in render_jpegs(64, self.size, seed=1)])
        rates: dict[int, float] = {}
        for batch in RAW_BATCHES:
            run = functools.partial(encoder.run_vision, pixels[:batch])
            rates[batch] = round(measure(run, batch), 1)
        return rates

    def encoding(self) -> dict[str, Any]:
        # Before and after the served sweep: the machine's share of CPU moves (shared cores).
        raw_before = self.raw_session()
        with self.server() as on:
            batched = self.load(on.address, "encode-image", ENCODE_SWEEP)
        raw_after = self.raw_session()
        raw = {b: max(raw_before[b], raw_after[b]) for b in RAW_BATCHES}
        best = max(raw.values())
        with self.server("--max-batch-size", "1") as off:
            single = self.load(off.address, "encode-image", (1, 32))
        served = max(step.throughput for step in batched)
        by_level = {int(step.level): step for step in batched}
        on_c1, on_c32 = by_level[1], by_level[32]
        off_c1, off_c32 = single
        self.results["batching"] = {
            "throughput_c32_on": round(on_c32.throughput, 1),
            "throughput_c32_off": round(off_c32.throughput, 1),
            "gain_c32": round(on_c32.throughput / off_c32.throughput, 2),
            "p50_ms_c1_on": p50(on_c1),
            "p50_ms_c1_off": p50(off_c1),
            "p50_cost_ms_c1": round(p50(on_c1) - p50(off_c1), 2),
            "goal_p50_cost_ms": 2.0 + 1.0,  # max_wait_ms (default 2) + 1
            "mean_batch_c32_on": on_c32.batch_size,
            "steps_off": [step.to_dict() for step in single],
        }
        return {
            "raw_images_per_s_by_batch": raw,
            "raw_before_after": [raw_before, raw_after],
            "raw_best": best,
            "served_images_per_s_by_concurrency": {
                int(step.level): round(step.throughput, 1) for step in batched
            },
            "served_best": round(served, 1),
            "served_vs_raw": round(served / best, 3),
            "goal": GOALS["served_vs_raw"],
            "server_ms_c64": by_level[64].server_ms,
            "mean_batch_by_concurrency": {int(s.level): s.batch_size for s in batched},
        }

    # --- 3: search overhead ----------------------------------------------------------------

    def search_overhead(self) -> dict[str, Any]:
        db = str(self.work / "search.db")
        gallery = self.work / "gallery"
        generate_gallery(gallery, self.args.gallery, seed=5)
        with self.server(db=db) as server:
            with Client(server.address, timeout=120) as client:
                ingested = client.ingest_path(
                    gallery / "manifest.csv",
                    caption_field="caption_en",
                    collection=COLLECTION,
                    progress=False,
                )
                if ingested.failed:
                    raise RuntimeError(f"ingest failed: {ingested.errors[:3]}")
                time.sleep(1.5)  # let Milvus Lite flush, as a long-running server would have
                vectors = client.encode_texts(list(QUERIES)).vectors
            (search,) = self.load(server.address, "search-text", (1,), COLLECTION)
            (encode,) = self.load(server.address, "encode-text", (1,))
        native = native_search_ms(db, vectors, self.args.seconds)
        search_p50, encode_p50 = p50(search), p50(encode)
        overhead = search_p50 - encode_p50 - native["p50"]
        return {
            "gallery": self.args.gallery,
            "search_text_p50_ms": search_p50,
            "encode_text_p50_ms": encode_p50,
            "native_pymilvus_p50_ms": native["p50"],
            "overhead_ms": round(overhead, 2),
            "goal_ms": GOALS["search_overhead_ms"],
            "search_server_ms": search.server_ms,
            "encode_server_ms": encode.server_ms,
        }

    # --- 4: priority under a bulk ingest ---------------------------------------------------

    def priority(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for label, flags in (("on", ()), ("off", ("--no-priority-queue",))):
            with self.server(*flags) as server:
                with Client(server.address) as client:
                    client.create_collection(COLLECTION, exist_ok=True)
                with BulkIngest(server.address, self.size) as bulk:
                    (step,) = self.load(server.address, "search-image", (4,), COLLECTION)
                out[label] = {
                    "search_p50_ms": p50(step),
                    "search_p99_ms": round(step.round_trip_ms.p99, 2)
                    if step.round_trip_ms
                    else None,
                    "search_ok_per_s": round(step.throughput, 1),
                    "search_server_ms": step.server_ms,
                    "ingest_items_per_s": round(bulk.rate(), 1),
                }
        on, off = out["on"]["search_p99_ms"], out["off"]["search_p99_ms"]
        if on and off:
            out["p99_off_vs_on"] = round(off / on, 2)
        return out

    def run(self) -> dict[str, Any]:
        self.record("served_encoding", self.encoding)
        self.record("search_overhead", self.search_overhead)
        self.record("priority", self.priority)
        return self.results


class BulkIngest:
    """One ingest stream of captioned JPEGs (unique ids) from a thread until closed."""

    def __init__(self, address: str, size: int) -> None:
        self._address = address
        self._images = render_jpegs(32, size, seed=7)
        self._stop = threading.Event()
        self._done = 0
        self._started = 0.0
        self._ended = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _items(self) -> Iterator[IngestItem]:
        for n in itertools.count():
            if self._stop.is_set():
                return
            yield IngestItem(
                id=f"bulk-{n}", image=self._images[n % len(self._images)], caption=QUERIES[n % 6]
            )

    def _run(self) -> None:
        with Client(self._address, timeout=600) as client:
            for _ in client.ingest(self._items(), collection=COLLECTION):
                self._done += 1

    def rate(self) -> float:
        return self._done / max(1e-9, self._ended - self._started)

    def __enter__(self) -> BulkIngest:
        self._started = time.monotonic()
        self._thread.start()
        time.sleep(1.0)  # the stream's window fills and the encoder's queue with it
        return self

    def __exit__(self, *exc: object) -> None:
        self._ended = time.monotonic()
        self._stop.set()
        self._thread.join(timeout=60)


def measure(fn: Callable[[], object], items: int, min_seconds: float = 1.0) -> float:
    """items/s over the median call, after one warm-up call."""
    fn()
    times: list[float] = []
    while sum(times) < min_seconds or len(times) < 3:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return items / statistics.median(times)


def p50(step: StepSummary) -> float:
    return round(step.round_trip_ms.p50, 2) if step.round_trip_ms else float("nan")


def native_search_ms(db: str, vectors: np.ndarray, seconds: float) -> dict[str, float]:
    """pymilvus MilvusClient.search on the server's own collection (the server stopped),
    with the search params and output fields the service uses."""
    index = IndexConfig()
    params = {"metric_type": index.metric, "params": search_params(index, 10, 0, None)}
    fields = list(validation.output_fields(()))
    client = MilvusClient(db)
    try:
        client.load_collection(COLLECTION)
        times: list[float] = []
        deadline = time.monotonic() + seconds
        for vector in itertools.cycle(vectors):
            started = time.perf_counter()
            client.search(
                COLLECTION,
                data=[vector],
                limit=10,
                output_fields=fields,
                search_params=params,
                anns_field=IMAGE_VECTOR,
            )
            times.append(time.perf_counter() - started)
            if time.monotonic() > deadline and len(times) >= 20:
                break
    finally:
        client.close()
    ms = np.asarray(times[len(vectors) :] or times) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "calls": len(times)}


def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="clipsearch-figures-"))
    started = time.monotonic()
    results = Figures(args, work).run()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print(summary(results))
    return 0


def summary(r: dict[str, Any]) -> str:
    enc, bat, srch, pri = (
        r["served_encoding"], r["batching"], r["search_overhead"], r["priority"]
    )  # fmt: skip
    lines = [
        f"model {r['model']}, {r['image_size']}px JPEGs, {r['cpus']} CPUs, {r['total_seconds']} s",
        f"served encoding: {enc['served_best']} img/s vs raw session {enc['raw_best']} "
        f"(best batch): {enc['served_vs_raw']} (goal ≥ {enc['goal']})",
        f"batching at c32: {bat['throughput_c32_on']} vs {bat['throughput_c32_off']} img/s "
        f"(×{bat['gain_c32']}); p50 at c1 {bat['p50_ms_c1_on']} vs {bat['p50_ms_c1_off']} ms "
        f"(cost {bat['p50_cost_ms_c1']} ms, goal ≤ {bat['goal_p50_cost_ms']})",
        f"search p50 {srch['search_text_p50_ms']} ms vs encode {srch['encode_text_p50_ms']} + "
        f"native {srch['native_pymilvus_p50_ms']} ms: overhead {srch['overhead_ms']} ms "
        f"(goal ≤ {srch['goal_ms']})",
        f"search p99 under bulk ingest: priority on {pri['on']['search_p99_ms']} ms, "
        f"off {pri['off']['search_p99_ms']} ms",
    ]
    return "\n".join(lines)
