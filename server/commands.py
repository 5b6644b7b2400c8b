"""`clipsearch serve`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from clipsearch.server.settings import Settings


def register(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "serve",
        help="run the gRPC search server",
        description=(
            "Serve Encode, Search, Ingest and collection calls over gRPC, with health and "
            "reflection. Defaults: the committed demo model, a Milvus Lite file "
            "./clipsearch.db, 127.0.0.1:50051. Every option can also be set by the "
            "environment variable shown; flags win. SIGINT/SIGTERM drain calls in flight "
            "and stop."
        ),
    )
    Settings.add_arguments(p)
    p.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write HOST:PORT to this file once the server is SERVING (for scripts, port 0)",
    )
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from clipsearch.client.cli import require

    require("server", "onnxruntime", "tokenizers", "PIL", "pymilvus")
    from clipsearch.server.app import configure_logging, serve
    from clipsearch.server.errors import ConfigurationError

    try:
        settings = Settings.from_args(args)
    except ConfigurationError as exc:
        print(f"clipsearch serve: {exc}")
        return 2
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings, args.ready_file))
