"""`clipsearch bench ...`: benchmarks that print the figures they claim."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable
from typing import Any

from clipsearch.cli import require
from clipsearch.defaults import DEFAULT_ADDRESS

# The same as clipsearch.bench.load_workload.SCENARIOS (kept here: --help imports nothing heavy).
LOAD_SCENARIOS = (
    "encode-text",
    "encode-image",
    "search-text",
    "search-image",
    "search-vector",
    "ingest",
)

# clipsearch.server.limits.INDEX_TYPES and the index_type setting's default, kept here
# like LOAD_SCENARIOS (tests/test_bench_search.py checks they agree).
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX")
DEFAULT_INDEX_TYPE = "HNSW"

FAULT_SCENARIOS = ("lite-kill9", "milvus-kill9", "milvus-restart", "drain", "disk-full")


def register(commands: Any) -> None:
    bench: argparse.ArgumentParser = commands.add_parser(
        "bench",
        help="benchmarks (encoder speed, search latency); minutes, not part of the tests",
        description="Benchmarks that print the figures they claim, as ratios measured in one run.",
    )
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    encoder: argparse.ArgumentParser = kinds.add_parser(
        "encoder",
        help="torch eager vs ONNX Runtime fp32/int8, batcher vs raw session, JPEG vs tensors",
        description=(
            "In one run on this machine, with random-weight ViT-B/32 (exported through "
            "'clipsearch export' on first use, cached in --work-dir) and with the demo model: "
            "torch eager fp32 vs ONNX Runtime fp32 vs int8 for both towers at batch 1/8/32; "
            "the batcher under 1/8/32 concurrent single-image requests vs the raw session's "
            "best batch; JPEG bytes -> vectors vs ready tensors -> vectors. --json prints the "
            "ratios under ort_fp32_vs_torch_b1, ort_int8_vs_torch_b32, int8_min_cosine, "
            "batcher_vs_raw_c32, jpeg_vs_tensor (ViT-B/32) plus every measurement."
        ),
    )
    encoder.add_argument("--json", action="store_true", help="print the results as JSON")
    encoder.add_argument(
        "--seconds", type=float, default=2.0, help="minimum timing per measurement (default: 2)"
    )
    encoder.add_argument(
        "--items", type=int, default=256, help="images per pipeline measurement (default: 256)"
    )
    encoder.add_argument(
        "--work-dir",
        default="~/.cache/clipsearch/bench",
        help="cache of the ViT-B/32 checkpoint and bundle (default: ~/.cache/clipsearch/bench)",
    )
    encoder.add_argument("--skip-vitb32", action="store_true", help="only the demo model")
    encoder.add_argument(
        "--demo-checkpoint",
        default="",
        help="the demo model's Hugging Face checkpoint, for its torch eager figures",
    )
    encoder.set_defaults(handler=_run_encoder)

    latency: argparse.ArgumentParser = kinds.add_parser(
        "latency",
        help="search latency and throughput of a real server process at 1/8/32 clients",
        description=(
            "A preset of 'bench load': starts 'clipsearch serve' (the demo model unless --model; "
            "Milvus Lite in a temp dir unless --milvus-uri), ingests a generated gallery, then "
            "runs a closed-loop search-text sweep at 1, 8 and 32 concurrent requests and prints "
            "queries/s, round-trip percentiles and the server's own breakdown (queue, "
            "preprocess, inference, search) taken from the replies."
        ),
    )
    latency.add_argument("--json", action="store_true", help="print the results as JSON")
    latency.add_argument("--n", type=int, default=1000, help="gallery size (default: 1000)")
    latency.add_argument(
        "--seconds", type=float, default=5.0, help="time per concurrency level (default: 5)"
    )
    latency.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        help="concurrent requests per step (default: 1 8 32)",
    )
    latency.add_argument("--model", default="", help="model bundle (default: the demo model)")
    latency.add_argument("--milvus-uri", default="", help="Milvus (default: Lite in a temp dir)")
    latency.set_defaults(handler=_run_latency)

    ingest: argparse.ArgumentParser = kinds.add_parser(
        "ingest",
        help="streaming ingest vs the encoder-only rate, into Milvus Lite and a Milvus server",
        description=(
            "Generates --count demo images with captions and, in one run, measures the "
            "encoder-only rate (EncodeStream, batches of 32), ingest with no store (memory:), "
            "into Milvus Lite and into a "
            "Milvus server started for the run (milvus-server), and raw pymilvus upserts into "
            "each (the store's own limit). Prints ingest_vs_encoder_server, "
            "ingest_vs_encoder_lite and every rate, and (on Linux) the CPU milliseconds per "
            "item that the clipsearch server, the Milvus server and the client used in each phase."
        ),
    )
    _add_store_run_arguments(ingest, count=10_000)
    ingest.add_argument(
        "--no-memory", action="store_true", help="skip the pass with no store (memory:)"
    )
    ingest.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="a flag for both `clipsearch serve` processes, e.g. --serve-arg=--intra-op-threads=1 "
        "(repeat it for several)",
    )
    ingest.set_defaults(handler=_run_ingest)
    _register_ingest_vectors(kinds)
    _register_load(kinds)
    _register_figures(kinds)
    _register_search(kinds)


def _register_figures(kinds: Any) -> None:
    figures: argparse.ArgumentParser = kinds.add_parser(
        "figures",
        help="the service's figures of docs/BENCHMARKS.md in one run (a few minutes)",
        description=(
            "Starts 'clipsearch serve' processes (the demo model unless --model, Milvus Lite in "
            "a temp dir) and drives them with the 'bench load' engine: served image encoding "
            "vs the raw ONNX Runtime session at its best batch; dynamic batching on vs off at "
            "concurrency 32 and its p50 cost at concurrency 1; text search p50 vs encode p50 + "
            "native pymilvus search p50 (the service's overhead); image search p99 during a "
            "bulk ingest with the priority queue on and off. Records the load average."
        ),
    )
    figures.add_argument("--json", action="store_true", help="print the results as JSON")
    figures.add_argument(
        "--seconds", type=float, default=4.0, help="measured seconds per load step (default: 4)"
    )
    figures.add_argument("--model", default="", help="model bundle (default: the demo model)")
    figures.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="side of the generated JPEGs (default: the model's input size)",
    )
    figures.add_argument(
        "--gallery", type=int, default=300, help="images in the search collection (default: 300)"
    )
    figures.set_defaults(handler=_run_figures)


def _register_search(kinds: Any) -> None:
    search: argparse.ArgumentParser = kinds.add_parser(
        "search",
        help="a large collection in Milvus Lite and a Milvus server: insert, index, search, recall",
        description=(
            "For each --rows and each store (Milvus Lite; a Milvus server started for the run), "
            "with the same vectors and queries: insert rate through the store layer, index "
            "build and load time, search p50/p99 through pymilvus directly and through "
            "'clipsearch serve' Search(vector) on loopback, recall@10 of each against exact "
            "numpy search, and the memory of the serve and Milvus process trees."
        ),
    )
    search.add_argument(
        "--rows",
        action="append",
        metavar="N[,N...]",
        help="collection sizes, repeatable or a comma list (default: 100000)",
    )
    search.add_argument(
        "--dim",
        type=int,
        default=512,
        help="vector dimension (default: 512; served by a random-weight model of that dim)",
    )
    search.add_argument(
        "--source",
        choices=("random", "demo"),
        default="random",
        help="random unit vectors, or the demo model's image vectors perturbed, queried by "
        "its caption vectors (default: random)",
    )
    search.add_argument(
        "--stores", default="lite,server", help="lite, server or both (default: lite,server)"
    )
    search.add_argument("--queries", type=int, default=500, help="queries (default: 500)")
    search.add_argument(
        "--index-type",
        choices=INDEX_TYPES,
        default=DEFAULT_INDEX_TYPE,
        help=f"vector index (default: {DEFAULT_INDEX_TYPE}, what clipsearch creates)",
    )
    search.add_argument(
        "--max-insert-s",
        type=float,
        default=0.0,
        help="stop inserting after this many seconds per store, measure what is in (default: no "
        "bound)",
    )
    search.add_argument("--model", default="", help="bundle to serve (default: see --dim)")
    search.add_argument(
        "--work-dir",
        default="~/.cache/clipsearch/bench",
        help="cache of the exported model (default: ~/.cache/clipsearch/bench)",
    )
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.set_defaults(handler=_run_search)


def _register_load(kinds: Any) -> None:
    load: argparse.ArgumentParser = kinds.add_parser(
        "load",
        help="load a running server: concurrency sweeps, open-loop rates, tables, JSON, plots",
        description=(
            "Sends one scenario (or a weighted --mix) to a running server, in closed loop at "
            "each --concurrency or in open loop at each --rate (latency from the time each "
            "request was due, so overload shows; requests that find --max-in-flight calls "
            "outstanding wait, and count as late or, past the step's end, dropped). Each step: "
            "--warmup unmeasured, then at most --duration seconds and --max-requests "
            "requests. Prints a row per step: throughput, latency percentiles, errors by "
            "status code, the server's mean batch size and stage times next to the client "
            "round trip. Loopback addresses only, unless --allow-remote."
        ),
    )
    load.add_argument(
        "--server",
        default=os.environ.get("CLIPSEARCH_SERVER", DEFAULT_ADDRESS),
        metavar="HOST:PORT",
        help=f"server address (default: $CLIPSEARCH_SERVER or {DEFAULT_ADDRESS})",
    )
    load.add_argument(
        "--scenario", choices=LOAD_SCENARIOS, default="search-text", help="(default: search-text)"
    )
    load.add_argument(
        "--mix",
        default="",
        metavar="NAME=W,...",
        help="weighted scenarios, e.g. search-text=3,ingest=1",
    )
    load.add_argument(
        "--concurrency",
        default="",
        metavar="N,N,...",
        help="closed-loop sweep (default when no --rate: 1,4,16,64)",
    )
    load.add_argument("--rate", default="", metavar="R,R,...", help="open-loop sweep, requests/s")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per step (default: 10)")
    load.add_argument(
        "--max-requests", type=int, default=None, help="measured requests per step at most"
    )
    load.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds before each step (default: 2)"
    )
    load.add_argument("--collection", default=None, help="(default: the server's default)")
    load.add_argument("--top-k", type=int, default=10, help="hits per search (default: 10)")
    load.add_argument(
        "--image-size", type=int, default=224, help="side of the generated JPEGs (default: 224)"
    )
    load.add_argument(
        "--ingest-items", type=int, default=1, help="items per ingest request (default: 1)"
    )
    load.add_argument(
        "--max-in-flight",
        type=int,
        default=512,
        help="open loop: calls outstanding at most (default: 512)",
    )
    load.add_argument(
        "--processes", type=int, default=1, help="load-generating processes (default: 1)"
    )
    load.add_argument("--timeout", type=float, default=30.0, help="deadline per call (default: 30)")
    load.add_argument(
        "--token",
        default=os.environ.get("CLIPSEARCH_TOKEN") or None,
        help="bearer token (default: $CLIPSEARCH_TOKEN)",
    )
    load.add_argument("--seed", type=int, default=0, help="payloads and mix choices (default: 0)")
    load.add_argument("--json", action="store_true", help="print the results as JSON")
    load.add_argument("--plot", default="", metavar="FILE.png", help="draw the sweep")
    load.add_argument("--no-progress", action="store_true", help="no progress bar")
    load.add_argument(
        "--no-ceiling", action="store_true", help="skip measuring the generator's own ceiling"
    )
    load.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback server address"
    )
    load.set_defaults(handler=_run_load)

    faults: argparse.ArgumentParser = kinds.add_parser(
        "faults",
        help="fault trials (kill -9, Milvus restart, SIGTERM drain, full disk) with exact counts",
        description=(
            "Runs 'clipsearch serve' and the resumable client ingest of generated items on "
            "loopback, breaks something mid-ingest and prints what the client was told "
            "against what the store holds (docs/RELIABILITY.md). Scenarios: lite-kill9, "
            "milvus-kill9, milvus-restart (need milvus-server), drain, disk-full (mounts a "
            "2 MiB tmpfs: root only). Exit code 0 only when every count is exact."
        ),
    )
    faults.add_argument(
        "--scenario", choices=("all", *FAULT_SCENARIOS), default="all", help="default: all"
    )
    faults.add_argument(
        "--items", type=int, default=0, help="items to ingest (default: 1500; disk-full 4000)"
    )
    faults.add_argument("--json", action="store_true", help="print the counts as JSON")
    faults.set_defaults(handler=_run_faults)

    soak: argparse.ArgumentParser = kinds.add_parser(
        "soak",
        help="mixed search/encode/ingest at saturation against a server child; leak check",
        description=(
            "Starts 'clipsearch serve' (demo model, Milvus Lite in a temp dir) and runs mixed "
            "search, encode and ingest clients on loopback for --seconds; reports errors by "
            "code, p50/p99 per call, and the server's RSS, threads and open files after the "
            "warm-up and at the end. Exit code 1 if RSS grew more than 10%% after the warm-up "
            "(mean of the last quarter of the samples over the first), threads or open files "
            "leaked, or a call failed."
        ),
    )
    soak.add_argument("--seconds", type=float, default=60.0, help="soak time (default: 60)")
    soak.add_argument(
        "--warmup-seconds", type=float, default=30.0, help="load before the baseline (default: 30)"
    )
    soak.add_argument("--clients", type=int, default=8, help="client threads (default: 8)")
    soak.add_argument("--json", action="store_true", help="print the report as JSON")
    soak.set_defaults(handler=_run_soak)


def _handler(module: str, *needs: tuple[str, ...]) -> Callable[[argparse.Namespace], int]:
    """The handler of `bench <module>`: check what it needs (each an `(extra, *modules)` for
    `require`), then import and run its `main` (imported late: `clipsearch bench --help`
    loads nothing heavy)."""

    def handle(args: argparse.Namespace) -> int:
        for extra, *modules in needs:
            require(extra, *modules)
        main: Callable[[argparse.Namespace], int] = importlib.import_module(
            f"clipsearch.bench.{module}"
        ).main
        return main(args)

    return handle


SERVER_EXTRAS = ("server", "onnxruntime", "PIL", "pymilvus")
_run_encoder = _handler("encoder", ("export", "torch", "transformers", "onnxruntime"))
_run_latency = _handler("latency", SERVER_EXTRAS)
_run_figures = _handler("figures", SERVER_EXTRAS)
_run_faults = _handler("faults", SERVER_EXTRAS)
_run_ingest = _handler("ingest", SERVER_EXTRAS)
_run_soak = _handler("soak", SERVER_EXTRAS)
_run_search = _handler("search", SERVER_EXTRAS)
_run_ingest_vectors = _handler(
    "ingest_vectors", ("server", "onnxruntime", "pymilvus"), ("parquet", "pyarrow")
)


def _add_store_run_arguments(parser: argparse.ArgumentParser, count: int) -> None:
    """The arguments of a benchmark that runs N items into Milvus Lite and a Milvus server."""
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--count", type=int, default=count, help=f"items (default: {count})")
    parser.add_argument("--no-server", action="store_true", help="skip the Milvus server")
    parser.add_argument("--no-lite", action="store_true", help="skip Milvus Lite")


def _register_ingest_vectors(kinds: Any) -> None:
    vectors: argparse.ArgumentParser = kinds.add_parser(
        "ingest-vectors",
        help="vectors computed elsewhere, from Parquet into Milvus Lite and a Milvus server",
        description=(
            "Writes N rows of random unit vectors (the served model's dimension, image and "
            "caption vector per row) in the Parquet layout 'clipsearch ingest FILE.parquet' "
            "reads, then times that ingest into Milvus Lite and into a Milvus server started "
            "for the run (Count exact, nothing encoded, Search(vector) finds rows with score "
            "1), the Parquet reader alone, and bare pymilvus upserts of as many rows (the "
            "store's limit). Prints ingest_vs_raw_lite, ingest_vs_raw_server and every rate."
        ),
    )
    _add_store_run_arguments(vectors, count=100_000)
    vectors.add_argument("--model", default="", help="bundle to serve (default: the demo model)")
    vectors.set_defaults(handler=_run_ingest_vectors)


def _run_load(args: argparse.Namespace) -> int:
    scenarios = [args.scenario, *(part.split("=")[0].strip() for part in args.mix.split(","))]
    if {"encode-image", "search-image", "ingest"}.intersection(scenarios):
        require("runtime", "PIL")  # the generated JPEGs
    if args.plot:
        require("bench", "matplotlib")
    from clipsearch.bench.load import main

    return main(args)
