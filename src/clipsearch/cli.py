"""`clipsearch`: one command line for export, serving, ingest, search and benchmarks.

Each command group registers its subcommands from a light `commands` module (argparse only);
a handler imports what it needs when it runs, so `clipsearch --help` works on a client-only
install, and a command whose extra is missing says which `pip install` adds it. Options
whose definitions live in a heavier module (the server's settings) are added to their
parser only when that parser parses or prints its help (`CommandParser.defer`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any
from urllib.parse import unquote, urlparse

COMMAND_MODULES = (
    "clipsearch.export.commands",
    "clipsearch.server.commands",
    "clipsearch.client.commands",
    "clipsearch.demo.commands",
    "clipsearch.bench.commands",
    "clipsearch.web.commands",
)
EXIT_MISSING_EXTRA = 2
EXIT_INTERRUPTED = 130
# What a shell reports for a filter killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141

Handler = Callable[[argparse.Namespace], int | None]


class MissingExtraError(RuntimeError):
    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this command needs '{module}', which comes with the [{extra}] extra: "
            f"{install_command(extra)}"
        )


def require(extra: str, *modules: str) -> None:
    """Import `modules` now, or fail with the install line of the extra that brings them."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(extra, module) from None


def install_command(extra: str) -> str:
    """The pip command that adds `extra` to this installation: from the directory it was
    installed from when it came from a source tree, else from the package index."""
    try:
        record = distribution("clipsearch").read_text("direct_url.json")
    except PackageNotFoundError:
        record = None
    origin: dict[str, Any] = json.loads(record) if record else {}
    url = urlparse(str(origin.get("url", "")))
    if url.scheme == "file" and "dir_info" in origin:
        editable = "-e " if origin["dir_info"].get("editable") else ""
        return f"pip install {editable}'{unquote(url.path)}[{extra}]'"
    return f"pip install 'clipsearch[{extra}]'"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that adds some of its options only when it is used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
        """Call `add_arguments(self)` before this parser first parses or formats help."""
        self._deferred.append(add_arguments)

    def _complete(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._complete()
        return super().parse_known_args(*args, **kwargs)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def build_parser() -> CommandParser:
    parser = CommandParser(
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
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as noise at interpreter exit
    except BrokenPipeError:
        # The reader went away (`clipsearch info | head -1`): stop quietly, like any filter.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    command = "clipsearch"
    try:
        args = build_parser().parse_args(argv)
        command = f"clipsearch {args.command}"
        handler: Handler = args.handler
        return int(handler(args) or 0)
    except MissingExtraError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
