"""Client subcommands: ingest, search, compare, profile, count, get, delete, collections,
info.

Each takes `--server` (default $CLIPSEARCH_SERVER or 127.0.0.1:50051), `--timeout`, the
token (`--token-file`, $CLIPSEARCH_TOKEN, or `--token`) and the TLS options (`--tls-ca`,
`--tls-cert`/`--tls-key` for mutual TLS; see `clipsearch.connection_options`). A failed
call prints `clipsearch CMD: CODE: message` on stderr and exits 1 (2 for local problems such
as an unreadable file); never a traceback.
Handlers import the client only when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch import connection_options
from clipsearch.defaults import DEFAULT_ADDRESS

if TYPE_CHECKING:
    import numpy as np

    from clipsearch.client.channel import TlsConfig
    from clipsearch.client.client import Client
    from clipsearch.client.types import Comparison, Hit, IngestSummary, SearchResult, ServerInfo

DEFAULT_SERVER = DEFAULT_ADDRESS
EXIT_CALL_FAILED = 1
EXIT_LOCAL_ERROR = 2
MAX_ERRORS_SHOWN = 20
# Columns of the hit table when --output-fields is not given, and the widths where the
# free-text columns are cut; ids and uris are always shown whole, to be pasted elsewhere.
TABLE_FIELDS = ("caption", "uri")
COLUMN_LIMITS = {"caption": 48, "metadata": 48}
COMPARE_COLUMN_LIMIT = 56  # one collection's column in `compare`

ClientHandler = Callable[[argparse.Namespace, "Client"], int | None]


def register(commands: Any) -> None:
    common = connection_parser()
    _register_ingest(commands, common)
    _register_search(commands, common)
    _register_compare(commands, common)
    _register_profile(commands, common)
    _register_count(commands, common)
    _register_get(commands, common)
    _register_delete(commands, common)
    _register_collections(commands, common)
    _register_info(commands, common)


def connection_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=os.environ.get("CLIPSEARCH_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"server address (default: $CLIPSEARCH_SERVER or {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each call (default: 30)",
    )
    connection_options.add_token_options(group)
    connection_options.add_tls_options(group)
    return common


def _add_collection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--collection",
        default=None,
        help="collection name (default: the server's default collection)",
    )


def _add_model(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help=f"a model the server serves: {what} (default: the server's default model; "
        "'clipsearch info' lists them)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _with_client(handler: ClientHandler) -> Callable[[argparse.Namespace], int]:
    """Run a handler with a connected client, turning errors into one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        from clipsearch.client.client import Client
        from clipsearch.client.errors import ClipsearchError
        from clipsearch.client.sources import SourceError

        if connection_options.token_on_command_line(args):
            _error(args, connection_options.TOKEN_ON_COMMAND_LINE)
        try:
            token = connection_options.bearer_token(args)
            tls = tls_config(args)
            with Client(args.server, timeout=args.timeout, token=token, tls=tls) as client:
                return int(handler(args, client) or 0)
        except ClipsearchError as exc:
            _error(args, f"{exc.code.name}: {exc.message}")
            return EXIT_CALL_FAILED
        except BrokenPipeError:  # the reader of stdout left: the entry point ends quietly
            raise
        except (OSError, SourceError, ValueError) as exc:
            _error(args, str(exc))
            return EXIT_LOCAL_ERROR

    return run


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    from clipsearch.client.channel import TlsConfig

    files = connection_options.tls_files(args)
    if files is None:
        return None
    return TlsConfig(
        root_certificates=files.root_certificates,
        certificate_chain=files.certificate_chain,
        private_key=files.private_key,
        server_name_override=files.server_name,
    )


def _error(args: argparse.Namespace, message: str) -> None:
    print(f"clipsearch {args.command}: {message}", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


# --- ingest ------------------------------------------------------------------------------


def _register_ingest(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "ingest",
        parents=[common],
        help="stream a directory of images or a CSV/JSONL/Parquet manifest into a collection",
        description=(
            "Stream images into a collection with a progress bar, then print a summary "
            "(ok / failed with reasons / skipped). PATH is a directory (every image file under "
            "it, recursively; id = the path relative to PATH, uri = the absolute path), a CSV "
            "or JSONL manifest (columns: id, path or uri, caption, every other column becomes "
            "metadata; relative paths are resolved against the manifest's folder), or one "
            "image, or Parquet (the manifest's columns, metadata as a JSON string; rows with "
            "an image_vector and optional caption_vector column, lists of float32, carry "
            "vectors computed elsewhere: stored as given, never re-encoded, by the model "
            "--vectors-model-id names or the file's schema metadata key clipsearch.model_id). "
            "Items are upserted by id, so running it again never duplicates; a broken "
            "connection is resumed. A manifest row that cannot describe an item is reported "
            "as failed (FILE:LINE: reason) and the ingest goes on. Exit code 1 if any item "
            "failed; the summary is printed even when the ingest stops early."
        ),
        epilog=(
            "example: clipsearch ingest gallery/manifest.csv --collection demo "
            "--caption-field caption_en; clipsearch ingest vectors.parquet --collection c "
            "--vectors-model-id $(clipsearch info --json | jq -r .model_id)"
        ),
    )
    p.add_argument(
        "path", metavar="PATH", help="a directory, a .csv/.jsonl/.parquet manifest, or an image"
    )
    p.add_argument(
        "--vectors-model-id",
        default=None,
        metavar="ID",
        help=(
            "the model id (clipsearch info) that computed the vectors Parquet rows carry "
            "(default: the file's schema metadata key clipsearch.model_id); it must be the "
            "collection's"
        ),
    )
    _add_collection(p)
    p.add_argument(
        "--caption-field",
        default=None,
        metavar="FIELD",
        help="manifest column holding the caption (default: caption)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="acknowledge ids already stored as skipped instead of re-encoding them",
    )
    p.add_argument(
        "--no-create",
        action="store_true",
        help="fail if the collection does not exist (default: create it)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=256,
        help="items in flight, sent but not yet acknowledged (default: 256)",
    )
    _add_model(
        p,
        "the model of the collection if it is created; an existing collection must have "
        "been built with it (without --model, an existing collection's own model is used)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_ingest))


def _run_ingest(args: argparse.Namespace, client: Client) -> int:
    from clipsearch.client.sources import open_source

    source = open_source(args.path, caption_field=args.caption_field)
    progress = not args.quiet
    started = time.perf_counter()
    stream = client.ingest(
        source,
        collection=args.collection,
        create_collection=not args.no_create,
        skip_existing=args.skip_existing,
        model=args.model,
        vectors_model_id=args.vectors_model_id or source.model_id,
        progress=progress,
        total=source.total if progress else None,
        window=args.window,
    )
    try:
        summary = stream.run()
    except BaseException:
        # Stopped early (a server error, an unreadable source, Ctrl-C): what landed so far,
        # then the error from the caller.
        _print_ingest_summary(args, stream.summary, time.perf_counter() - started)
        if not args.json:
            print(f"stopped before the end of {args.path}")
        raise
    _print_ingest_summary(args, summary, time.perf_counter() - started)
    return EXIT_CALL_FAILED if summary.failed else 0


def _print_ingest_summary(args: argparse.Namespace, summary: IngestSummary, seconds: float) -> None:
    if args.json:
        _print_json(summary.to_dict())
    else:
        print(_format_ingest_summary(summary, seconds))


def _format_ingest_summary(summary: IngestSummary, seconds: float) -> str:
    rate = summary.total / seconds if seconds > 0 else 0.0
    lines = [
        f"{summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
        f"({summary.total} items in {seconds:.1f} s, {rate:.1f} items/s)"
    ]
    if summary.reconnects:
        lines.append(f"the stream was resumed {summary.reconnects} time(s)")
    if summary.errors:
        lines.append("failed:")
        lines += [f"  {item_id}: {error}" for item_id, error in summary.errors[:MAX_ERRORS_SHOWN]]
        if len(summary.errors) > MAX_ERRORS_SHOWN:
            lines.append(f"  ... and {len(summary.errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


# --- search ------------------------------------------------------------------------------


def _add_query(p: argparse.ArgumentParser, *, vector: bool) -> None:
    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="a text query")
    p.add_argument("--image", metavar="FILE", help="query with this image file")
    p.add_argument("--like", metavar="ID", help='"more like this": a stored item\'s id')
    if vector:
        p.add_argument(
            "--vector-file",
            metavar="FILE",
            help="query with a vector: a .npy file, or numbers as a JSON list or whitespace "
            "/ comma separated text",
        )
    p.add_argument(
        "--target",
        choices=("image", "caption", "both"),
        default="image",
        help="search image vectors, caption vectors, or both fused by reciprocal rank "
        "fusion (default: image)",
    )
    p.add_argument("--top-k", type=int, default=10, help="hits to return (default: 10)")
    p.add_argument(
        "--filter",
        default="",
        metavar="EXPR",
        help='Milvus boolean expression, e.g. \'metadata["colour"] == "red"\'',
    )
    _add_collection(p)


def _register_search(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "search",
        parents=[common],
        help="search a collection by text, image, vector or stored item",
        description=(
            "Nearest neighbours of one query: TEXT, --image FILE, --like ID (a stored item: "
            "more like this) or --vector-file FILE. Prints a table (rank, score, id, caption, "
            "uri, or the --output-fields) and the server's timing; --json prints "
            "{hits: [...], timing: {...}}."
        ),
        epilog=(
            'examples: clipsearch search "a red circle" --collection demo | '
            "clipsearch search --image q.jpg --target caption | "
            'clipsearch search --like demo-0-000001 --filter \'metadata["background"] == '
            '"dark"\''
        ),
    )
    _add_query(p, vector=True)
    p.add_argument("--offset", type=int, default=0, help="skip this many best hits (paging)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="index search parameter, e.g. --param ef=128 (HNSW) or --param nprobe=16",
    )
    p.add_argument(
        "--output-fields",
        type=_field_list,
        default=[],
        metavar="FIELDS",
        help="comma list of the stored fields to return with each hit: uri, caption, "
        "metadata (default: all; the table then shows caption and uri)",
    )
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_search))


def _field_list(value: str) -> list[str]:
    return list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))


def _query_arguments(args: argparse.Namespace) -> dict[str, Any]:
    given = [
        name
        for name in ("text", "image", "like", "vector_file")
        if getattr(args, name, None) is not None
    ]
    if len(given) != 1:
        options = "TEXT, --image FILE, --like ID" + (
            " or --vector-file FILE" if hasattr(args, "vector_file") else ""
        )
        raise ValueError(f"give exactly one query: {options}")
    query: dict[str, Any] = {"text": args.text, "like": args.like}
    if args.image is not None:
        query["image"] = Path(args.image).read_bytes()
    if getattr(args, "vector_file", None) is not None:
        query["vector"] = read_vector_file(Path(args.vector_file))
    return query


def read_vector_file(path: Path) -> np.ndarray:
    """A query vector from a .npy file, or from text: a JSON list or separated numbers."""
    import numpy as np

    if path.suffix == ".npy":
        vector = np.load(path, allow_pickle=False)
    else:
        text = path.read_text(encoding="utf-8").strip()
        try:
            values = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
            vector = np.asarray(values, dtype=np.float32)
        except (ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a list of numbers: {exc}") from None
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.size == 0:
        raise ValueError(f"{path}: the vector is empty")
    return vector


def parse_params(pairs: Sequence[str]) -> dict[str, float]:
    params: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            params[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--param {pair!r}: expected NAME=NUMBER, e.g. ef=128") from None
    return params


def _run_search(args: argparse.Namespace, client: Client) -> int:
    query = _query_arguments(args)
    result = client.search(
        **query,
        target=args.target,
        top_k=args.top_k,
        offset=args.offset,
        filter=args.filter,
        params=parse_params(args.param),
        output_fields=args.output_fields,
        collection=args.collection,
    )
    if args.json:
        data = result.to_dict()
        if args.output_fields:
            kept = {"id", "score", *args.output_fields}
            data["hits"] = [{k: v for k, v in hit.items() if k in kept} for hit in data["hits"]]
        _print_json(data)
    else:
        fields = args.output_fields or TABLE_FIELDS
        print(format_hits(result, first_rank=args.offset + 1, fields=fields))
    return 0


def display_width(text: str) -> int:
    """Terminal columns of a string: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` columns (with an ellipsis) and padded to exactly `width`."""
    text = text.replace("\n", " ")
    if display_width(text) > width:
        cut = ""
        for ch in text:
            if display_width(cut + ch) > width - 1:
                break
            cut += ch
        text = cut + "…"
    return text + " " * (width - display_width(text))


def _cell(hit: Hit, field: str) -> str:
    if field == "metadata":
        return json.dumps(hit.metadata, ensure_ascii=False) if hit.metadata else ""
    return str(getattr(hit, field, ""))


def format_hits(
    result: SearchResult, first_rank: int = 1, fields: Sequence[str] = TABLE_FIELDS
) -> str:
    """The hits as a table (rank, score, id, then `fields`) and a timing line. Ids and uris
    are shown whole; captions and metadata are cut to a column."""
    lines = []
    if not result.hits:
        lines.append("no hits")
    else:
        names = ["id", *fields]
        cells = [[_cell(hit, name) for name in names] for hit in result.hits]
        widths = []
        for i, name in enumerate(names):
            width = max(display_width(name), *(display_width(row[i]) for row in cells))
            widths.append(min(width, COLUMN_LIMITS.get(name, width)))
        lines.append(_row(f"{'rank':>4}  {'score':>7}", names, widths))
        for rank, (hit, row) in enumerate(zip(result.hits, cells, strict=True), start=first_rank):
            lines.append(_row(f"{rank:>4}  {hit.score:7.4f}", row, widths))
    if result.query_truncated:
        lines.append("note: the query text was longer than the model's context and was cut")
    lines.append(f"timing: {result.timing}")
    return "\n".join(lines)


def _row(start: str, cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = (_fit(cell, width) for cell, width in zip(cells, widths, strict=True))
    return "  ".join((start, *padded)).rstrip()


# --- compare -----------------------------------------------------------------------------


def _register_compare(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "compare",
        parents=[common],
        help="run one query against several collections (built with different models) side by side",
        description=(
            "Search each of --collections with the same query (TEXT or --image FILE); the "
            "server encodes it with each collection's own model. Prints the hits in one "
            "column per collection (score, id, caption), with the model, the server's timing "
            "and the round trip of each; --json prints {query, collections: [...]}; --grid "
            "draws the hits' images, one row per collection (needs the [server] extra for "
            "pillow; hits whose uri is not a local image file are drawn blank)."
        ),
        epilog=(
            'example: clipsearch compare "a red circle" --collections demo,demo_cclip '
            "--top-k 5 --grid compare.png"
        ),
    )
    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="a text query")
    p.add_argument("--image", metavar="FILE", help="query with this image file")
    p.add_argument(
        "--collections",
        type=_field_list,
        required=True,
        metavar="A,B",
        help="comma list of the collections to search",
    )
    p.add_argument(
        "--target",
        choices=("image", "caption", "both"),
        default="image",
        help="search image vectors, caption vectors, or both (default: image)",
    )
    p.add_argument("--top-k", type=int, default=5, help="hits per collection (default: 5)")
    p.add_argument("--filter", default="", metavar="EXPR", help="Milvus boolean expression")
    p.add_argument("--grid", metavar="FILE.png", help="also draw the hits as an image grid")
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_compare))


def _run_compare(args: argparse.Namespace, client: Client) -> int:
    if (args.text is None) == (args.image is None):
        raise ValueError("give exactly one query: TEXT or --image FILE")
    if args.grid is not None:
        from clipsearch.cli import require

        require("server", "PIL")
    comparison = client.compare(
        args.text,
        image=args.image,
        collections=args.collections,
        target=args.target,
        top_k=args.top_k,
        filter=args.filter,
    )
    if args.json:
        _print_json(comparison.to_dict())
    else:
        print(format_comparison(comparison))
    if args.grid is not None:
        from clipsearch.demo.grid import comparison_rows, write_grid

        query_image = Path(args.image) if args.image is not None else None
        path = write_grid(Path(args.grid), comparison_rows(comparison, query_image))
        if not args.json:
            print(f"grid: {path}")
    return 0


def format_comparison(comparison: Comparison, limit: int = COMPARE_COLUMN_LIMIT) -> str:
    """One column per collection: its name and model, then each hit's score, id and
    caption, then its server timing and round trip; rank down the left."""
    results = comparison.results
    depth = max((len(r.result.hits) for r in results), default=0)
    labels = ["", "rank", *(str(rank) for rank in range(1, depth + 1)), "server", "round trip"]
    columns = []
    for r in results:
        t = r.result.timing
        cells = [f"{r.collection} [{r.model or '?'}]", f"{'score':>6}  id  caption"]
        cells += [f"{hit.score:6.3f}  {hit.id}  {hit.caption}" for hit in r.result.hits]
        cells += [""] * (depth - len(r.result.hits))
        cells.append(
            f"{t.total_ms:.2f} ms (inference {t.inference_ms:.2f}, search {t.search_ms:.2f})"
        )
        cells.append(f"{r.round_trip_ms:.2f} ms")
        columns.append(cells)
    widths = [min(limit, max(display_width(cell) for cell in cells)) for cells in columns]
    label_width = max(display_width(label) for label in labels)
    lines = [f"{comparison.query} -> {comparison.target}, top {comparison.top_k}"]
    for row, label in enumerate(labels):
        row_cells = [_fit(column[row], w) for column, w in zip(columns, widths, strict=True)]
        lines.append("   ".join((f"{label:>{label_width}}", *row_cells)).rstrip())
    if any(r.result.query_truncated for r in results):
        lines.append("note: the query text was longer than a model's context and was cut")
    return "\n".join(lines)


# --- profile -----------------------------------------------------------------------------


def _register_profile(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "profile",
        parents=[common],
        help="show where the time of a search (or encode) goes",
        description=(
            "Run one query (--repeat N times; figures are medians) and print a tree: client "
            "round trip, network + client, server total, and the server's queue / preprocess "
            "/ inference / search / unaccounted time."
        ),
        epilog='example: clipsearch profile "a red circle" --collection demo --repeat 10',
    )
    _add_query(p, vector=False)
    p.add_argument("--repeat", type=int, default=1, help="calls to make (default: 1)")
    p.add_argument(
        "--encode",
        action="store_true",
        help="profile an Encode of the text or image instead of a Search",
    )
    _add_model(p, "with --encode, the model to encode with (a search uses its collection's)")
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_profile))


def _run_profile(args: argparse.Namespace, client: Client) -> int:
    query = _query_arguments(args)
    profile = client.profile(
        **query,
        call="encode" if args.encode else "search",
        target=args.target,
        top_k=args.top_k,
        filter=args.filter,
        collection=args.collection,
        model=args.model,
        repeat=args.repeat,
    )
    if args.json:
        _print_json(profile.to_dict())
    else:
        print(profile.render())
    return 0


# --- items -------------------------------------------------------------------------------


def _register_count(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "count",
        parents=[common],
        help="count the items of a collection",
        description="Print how many items the collection holds (matching --filter, if given).",
    )
    _add_collection(p)
    p.add_argument("--filter", default="", metavar="EXPR", help="Milvus boolean expression")
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_count))


def _run_count(args: argparse.Namespace, client: Client) -> int:
    count = client.count(args.filter, collection=args.collection)
    if args.json:
        _print_json({"count": count})
    else:
        print(count)
    return 0


def _register_get(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "get",
        parents=[common],
        help="show stored items by id",
        description=(
            "Print the stored items (id, uri, caption, metadata) of the given ids, one JSON "
            "object per line. Exit code 1 if any id is missing."
        ),
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    _add_collection(p)
    p.add_argument("--vectors", action="store_true", help="include the stored vectors")
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_get))


def _run_get(args: argparse.Namespace, client: Client) -> int:
    items = client.get(args.ids, include_vectors=args.vectors, collection=args.collection)
    found = {item.id for item in items}
    missing = [i for i in dict.fromkeys(args.ids) if i not in found]
    if args.json:
        _print_json({"items": [item.to_dict() for item in items], "missing": missing})
    else:
        for item in items:
            print(json.dumps(item.to_dict(), ensure_ascii=False))
        if missing:
            _error(args, f"not found: {', '.join(missing)}")
    return EXIT_CALL_FAILED if missing else 0


def _register_delete(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "delete",
        parents=[common],
        help="delete items by id",
        description="Delete the given ids from the collection and print how many existed.",
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    _add_collection(p)
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_delete))


def _run_delete(args: argparse.Namespace, client: Client) -> int:
    deleted = client.delete(args.ids, collection=args.collection)
    if args.json:
        _print_json({"deleted": deleted})
    else:
        print(f"deleted {deleted} of {len(set(args.ids))}")
    return 0


# --- collections and info ----------------------------------------------------------------


def _register_collections(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "collections",
        parents=[common],
        help="list, create or drop collections",
        description=(
            "clipsearch collections [list] | create NAME [--exist-ok] | drop NAME. A new "
            "collection is built for the model the server serves."
        ),
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=("list", "create", "drop"),
        default="list",
        help="list (default): collections with their item counts; create NAME; drop NAME "
        "(drops all its items)",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="collection to create or drop")
    p.add_argument(
        "--exist-ok", action="store_true", help="create: succeed if it exists (default: fail)"
    )
    _add_model(p, "create: the model the collection is built for")
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_collections))


def _run_collections(args: argparse.Namespace, client: Client) -> int:
    if args.action in ("create", "drop") and not args.name:
        raise ValueError(f"collections {args.action} needs a collection NAME")
    if args.action == "list" and args.name:
        raise ValueError("collections list takes no NAME")
    if args.model is not None and args.action != "create":
        raise ValueError("--model goes with collections create")
    if args.action == "create":
        created = client.create_collection(args.name, exist_ok=args.exist_ok, model=args.model)
        if args.json:
            _print_json({"name": args.name, "created": created})
        else:
            print(f"created {args.name}" if created else f"{args.name} already exists")
        return 0
    if args.action == "drop":
        client.drop_collection(args.name)
        if args.json:
            _print_json({"name": args.name, "dropped": True})
        else:
            print(f"dropped {args.name}")
        return 0
    collections = client.list_collections()
    if args.json:
        _print_json(
            [
                {
                    "name": c.name,
                    "count": c.count,
                    "dim": c.dim,
                    "model_id": c.model_id,
                    "model": c.model,
                }
                for c in collections
            ]
        )
    elif not collections:
        print("no collections")
    else:
        width = max(4, *(len(c.name) for c in collections))
        model_width = max(5, *(len(c.model) for c in collections))
        print(f"{'name':<{width}}  {'count':>9}  {'dim':>5}  {'model':<{model_width}}  model_id")
        for c in collections:
            model = c.model or "-"
            print(
                f"{c.name:<{width}}  {c.count:>9}  {c.dim:>5}  {model:<{model_width}}  {c.model_id}"
            )
    return 0


def _register_info(commands: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "info",
        parents=[common],
        help="show the served models, their precision, execution providers and versions",
        description="Print what the server serves: the default model (dimension, precision, "
        "providers), every model served with its memory and start-up time, the store and "
        "versions.",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="also the batchers' live figures: queue depth, batches, mean batch size, drops",
    )
    _add_json(p)
    p.set_defaults(handler=_with_client(_run_info))


def _run_info(args: argparse.Namespace, client: Client) -> int:
    info = client.info()
    if args.json:
        from dataclasses import asdict

        data = asdict(info)
        _print_json(data)
        return 0
    rows = [
        ("model", f"{info.model_name} ({info.model_family}, from {info.source_checkpoint})"),
        ("model id", info.model_id),
        ("dim", str(info.dim)),
        ("context length", str(info.context_length)),
        ("image size", str(info.image_size)),
        ("text tower", f"{info.text.precision} on {', '.join(info.text.providers)}"),
        ("vision tower", f"{info.vision.precision} on {', '.join(info.vision.providers)}"),
        ("max batch size", str(info.text.max_batch_size)),
        ("store", info.store),
        ("clipsearch", info.version),
    ]
    rows += [(name, version) for name, version in sorted(info.versions.items())]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if info.models:
        print(f"\nmodels served ({len(info.models)}; the first is the default):")
        name_width = max(4, *(len(m.name) for m in info.models))
        print(
            f"  {'name':<{name_width}}  {'family':<12}  {'dim':>4}  {'precision':<9}  "
            f"{'memory':>9}  {'start-up':>8}  model_id"
        )
        for m in info.models:
            print(
                f"  {m.name:<{name_width}}  {m.family:<12}  {m.dim:>4}  {m.precision:<9}  "
                f"{m.memory_mb:>6.1f} MiB  {m.startup_s:>6.2f} s  {m.model_id}"
            )
    if args.stats:
        print()
        print(_batcher_table(info))
    return 0


def _batcher_table(info: ServerInfo) -> str:
    header = (
        "batcher", "queued", "(bulk)", "batches", "items", "mean batch", "cancelled",
        "expired", "failed", "rejected",
    )  # fmt: skip
    rows = [header] + [
        (
            b.name,
            str(b.queued_interactive + b.queued_bulk),
            str(b.queued_bulk),
            str(b.batches),
            str(b.items),
            f"{b.mean_batch_size:.2f}",
            str(b.dropped_cancelled),
            str(b.dropped_expired),
            str(b.failed_batches),
            str(b.rejected_overload),
        )
        for b in info.batchers
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )
