"""`clipsearch web`: the search page and HTTP API in front of a clipsearch server."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from clipsearch import connection_options
from clipsearch.cli import require
from clipsearch.client.commands import connection_parser, tls_config

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def register(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "web",
        parents=[connection_parser()],
        help="a search page and an HTTP API (JSON, OpenAI-compatible embeddings) for a server",
        description=(
            "Serves one page: a search box (any language the model reads), image upload, a "
            "result grid with thumbnails, scores and the server's timing, 'similar' on every "
            "hit, and the same query against several collections side by side. Beside it, "
            "JSON endpoints (/api/search, /api/encode, ...), an OpenAI-compatible "
            "POST /v1/embeddings and the OpenAPI description (/openapi.json). It talks to "
            "the clipsearch server(s) over gRPC; it keeps no state but caches."
        ),
        epilog="example: clipsearch web --server 127.0.0.1:50051 --media-root ./gallery",
    )
    p.add_argument(
        "--extra-server",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="another server (e.g. one serving another model) whose collections the page can "
        "compare side by side; repeatable",
    )
    p.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})"
    )
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: any)"
    )
    p.add_argument(
        "--media-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="show thumbnails of hits whose uri is a file under DIR (nothing outside it is "
        "read; default: no thumbnails)",
    )
    p.add_argument(
        "--thumbnail-cache-mb",
        type=int,
        default=64,
        metavar="MB",
        help="memory for resized thumbnails (default: 64)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="uvicorn's log level (default: warning)",
    )
    p.set_defaults(handler=_run_web)


def _run_web(args: argparse.Namespace) -> int:
    require("web", "fastapi", "uvicorn", "multipart", "PIL")
    from clipsearch.web.backends import WebConfig
    from clipsearch.web.serve import WebServer

    if args.media_root is not None and not args.media_root.is_dir():
        print(f"clipsearch web: --media-root {args.media_root} is not a directory", file=sys.stderr)
        return 2
    if connection_options.token_on_command_line(args):
        print(f"clipsearch web: {connection_options.TOKEN_ON_COMMAND_LINE}", file=sys.stderr)
    try:
        token = connection_options.bearer_token(args)
        tls = tls_config(args)
    except (OSError, ValueError) as exc:
        print(f"clipsearch web: {exc}", file=sys.stderr)
        return 2
    config = WebConfig(
        servers=(args.server, *args.extra_server),
        timeout=args.timeout,
        token=token,
        tls=tls,
        media_root=args.media_root,
        thumbnail_cache_mb=args.thumbnail_cache_mb,
    )
    try:
        server = WebServer(config, args.host, args.port, log_level=args.log_level)
    except OSError as exc:
        print(f"clipsearch web: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"clipsearch web on {server.url} (servers: {', '.join(config.servers)})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how this command stops
        server.serve_forever()
    return 0
