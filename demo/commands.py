"""`clipsearch demo`."""

from __future__ import annotations

import argparse
import contextlib
from functools import partial
from pathlib import Path
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
            "PNG, and stops the server. With --web it then serves the search page on "
            "loopback against the demo server until Ctrl-C."
        ),
    )
    p.add_argument(
        "--out", default="clipsearch-demo", help="working directory (default: ./clipsearch-demo)"
    )
    p.add_argument("--n", type=int, default=300, help="gallery size (default: 300)")
    p.add_argument("--top-k", type=int, default=5, help="hits shown per query (default: 5)")
    p.add_argument("--seed", type=int, default=7, help="gallery seed (default: 7)")
    p.add_argument(
        "--web",
        action="store_true",
        help="after the queries, keep the server running and serve the search page "
        "(clipsearch web) on 127.0.0.1 until Ctrl-C",
    )
    p.add_argument(
        "--web-port", type=int, default=8000, help="port of the page (default: 8000; 0: any)"
    )
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    require("server", "onnxruntime", "PIL", "pymilvus")
    if args.web:
        require("web", "fastapi", "uvicorn", "multipart")
    from clipsearch.demo.run import main

    return main(args, hold=partial(_serve_page, port=args.web_port) if args.web else None)


def _serve_page(address: str, gallery: Path, *, port: int) -> None:
    """`clipsearch web` against the demo server, thumbnails from the gallery, until Ctrl-C."""
    from clipsearch.web.backends import WebConfig
    from clipsearch.web.serve import WebServer

    page = WebServer(WebConfig(servers=(address,), media_root=gallery), "127.0.0.1", port)
    print(f"7. the search page: {page.url}  (Ctrl-C stops the demo)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        page.serve_forever()
