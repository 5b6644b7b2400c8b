"""`clipsearch bench ...`: benchmarks that print the figures they claim."""

from __future__ import annotations

import argparse
from typing import Any

from clipsearch.cli import require


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
            "Starts 'clipsearch serve' (the demo model unless --model; Milvus Lite in a temp "
            "dir unless --milvus-uri), ingests a generated gallery, then runs text searches "
            "from 1, 8 and 32 client threads and prints queries/s, round-trip p50/p99 and the "
            "server's own breakdown (queue, inference, search) taken from the replies."
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
        help="client thread counts (default: 1 8 32)",
    )
    latency.add_argument("--model", default="", help="model bundle (default: the demo model)")
    latency.add_argument("--milvus-uri", default="", help="Milvus (default: Lite in a temp dir)")
    latency.set_defaults(handler=_run_latency)


def _run_encoder(args: argparse.Namespace) -> int:
    require("export", "torch", "transformers", "onnxruntime")
    from clipsearch.bench.encoder import main

    return main(args)


def _run_latency(args: argparse.Namespace) -> int:
    require("server", "onnxruntime", "PIL", "pymilvus")
    from clipsearch.bench.latency import main

    return main(args)
