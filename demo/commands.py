"""`clipsearch demo`."""

from __future__ import annotations

import argparse
from typing import Any

from clipsearch.cli import require


def register(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="see it work: serve the demo model, ingest a generated gallery, search it",
        description=(
            "Runs the whole service on its embedded defaults, offline: generates the demo "
            "gallery (coloured shapes with English and Chinese captions), starts "
            "'clipsearch serve' (demo model + Milvus Lite) in a child process, ingests the "
            "gallery with a progress bar, asks queries in all four directions (text->image, "
            "text->text, image->image, image->text) in English and Chinese plus 'more like "
            "this', a filter and fused search, prints hits with timings, writes a result grid "
            "PNG, and stops the server."
        ),
    )
    p.add_argument(
        "--out", default="clipsearch-demo", help="working directory (default: ./clipsearch-demo)"
    )
    p.add_argument("--n", type=int, default=300, help="gallery size (default: 300)")
    p.add_argument("--top-k", type=int, default=5, help="hits shown per query (default: 5)")
    p.add_argument("--seed", type=int, default=7, help="gallery seed (default: 7)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    require("server", "onnxruntime", "PIL", "pymilvus")
    from clipsearch.demo.run import main

    return main(args)
