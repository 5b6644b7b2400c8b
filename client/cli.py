"""`clipsearch`: one command line for export, serving, ingest, search and benchmarks.

Each package registers its subcommands from a light `commands` module; a handler imports
what it needs only when it runs, so `clipsearch --help` works on a client-only install and a
missing extra is reported with the install line that fixes it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

COMMAND_MODULES = (
    "clipsearch.export.commands",
    "clipsearch.server.commands",
    "clipsearch.client.commands",
    "clipsearch.demo.commands",
    "clipsearch.bench.commands",
)

Handler = Callable[[argparse.Namespace], int | None]


class MissingExtraError(RuntimeError):
    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this command needs '{module}', which comes with the [{extra}] extra: "
            f"pip install 'clipsearch[{extra}]'"
        )


def require(extra: str, *modules: str) -> None:
    """Import `modules` now, or fail with the install line of the extra that brings them."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(extra, module) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipsearch",
        description=(
            "Text-to-image search over gRPC: CLIP encoders on ONNX Runtime, vectors in Milvus. "
            "Run 'clipsearch demo' to see it work end to end on the bundled demo model."
        ),
    )
    from clipsearch import __version__

    parser.add_argument("--version", action="version", version=f"clipsearch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except MissingExtraError as exc:
        print(f"clipsearch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
