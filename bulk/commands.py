"""`clipsearch bulk`: argparse only; the run imports Ray, ONNX Runtime and pymilvus."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from clipsearch.cli import require

EXIT_FAILED_ITEMS = 1
EXIT_BAD_RUN = 2
MAX_ERRORS_SHOWN = 20


def register(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "bulk",
        help="encode a large corpus on a Ray cluster straight into Milvus (or Parquet)",
        description=(
            "Encode every image of SOURCE with the model bundle's ONNX towers in a pool of Ray "
            "actors (one encoder per actor) and write the vectors to a collection by id, "
            "through the same store, schema and ids as 'clipsearch ingest' (content hash when "
            "an item has no id), so the server searches the collection as if it had been "
            "ingested. SOURCE: a directory of images, a CSV/JSONL manifest (as for ingest), "
            "or Parquet (a .parquet file or folder) with the same columns. Writes are upserts: "
            "a rerun converges to one row per item; --skip-existing resumes a big run cheaply. "
            "Without --ray-address a local Ray instance is started. Prints a summary (ok, "
            "failed with reasons, throughput); exit code 1 if any item failed, 2 if the run "
            "could not start."
        ),
        epilog=(
            "example: clipsearch bulk gallery/manifest.csv --caption-field caption_en "
            "--collection demo --milvus-uri http://milvus:19530 --create --actors 8"
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="directory, .csv/.jsonl manifest, .parquet")
    p.add_argument("--collection", required=True, help="the collection to write")
    p.add_argument(
        "--milvus-uri",
        default="",
        help="http://host:19530 (Milvus server or cluster) or a Milvus Lite .db path",
    )
    p.add_argument(
        "--milvus-token",
        default=os.environ.get("CLIPSEARCH_MILVUS_TOKEN", ""),
        help="Milvus token or user:password (default: $CLIPSEARCH_MILVUS_TOKEN)",
    )
    p.add_argument(
        "--parquet-out",
        default="",
        metavar="DIR",
        help="instead of Milvus, write Parquet for Milvus bulk insert under DIR/COLLECTION "
        "and DIR/COLLECTION__captions",
    )
    p.add_argument("--model", default="", help="model bundle (default: the demo model)")
    p.add_argument("--caption-field", default=None, help="manifest column of the caption")
    p.add_argument("--actors", type=int, default=1, help="encode actors (default: 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per actor call (default: 64)")
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs reserved per actor; also its ONNX Runtime threads (default: 1)",
    )
    p.add_argument(
        "--num-gpus-per-actor",
        type=float,
        default=0.0,
        help="GPUs per actor (e.g. 1, or 0.5 to share one); > 0 runs the towers on CUDA "
        "(default: 0, CPU)",
    )
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="a running Ray cluster, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, "
        "else a local Ray instance)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave items whose id is already stored alone (checked in batches before "
        "encoding; items without an id after hashing their image)",
    )
    p.add_argument("--create", action="store_true", help="create the collection if missing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_bulk)


def _run_bulk(args: argparse.Namespace) -> int:
    require("bulk", "ray.data", "pyarrow")
    require("server", "onnxruntime", "pymilvus", "PIL")
    from clipsearch.bulk.run import BulkError, BulkOptions, run
    from clipsearch.client.sources import SourceError
    from clipsearch.server.errors import ClipsearchError

    options = BulkOptions(
        source=args.source,
        collection=args.collection,
        milvus_uri=args.milvus_uri,
        milvus_token=args.milvus_token,
        parquet_out=args.parquet_out,
        model=args.model,
        actors=args.actors,
        batch_size=args.batch_size,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.num_gpus_per_actor,
        ray_address=args.ray_address,
        skip_existing=args.skip_existing,
        create=args.create,
        caption_field=args.caption_field,
        progress=not args.quiet,
    )
    try:
        summary = run(options)
    except (BulkError, SourceError, ClipsearchError) as exc:
        print(f"clipsearch bulk: {exc}", file=sys.stderr)
        return EXIT_BAD_RUN
    if args.json:
        print(json.dumps(summary.to_dict(), ensure_ascii=False))
    else:
        print(
            f"{summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
            f"({summary.total} items in {summary.seconds:.1f} s, "
            f"{summary.items_per_second:.1f} items/s encoded, {summary.actors} actor(s)) "
            f"-> {summary.destination}"
        )
        if summary.errors:
            print("failed:")
            for item, error in summary.errors[:MAX_ERRORS_SHOWN]:
                print(f"  {item}: {error}")
            if len(summary.errors) > MAX_ERRORS_SHOWN:
                print(f"  ... and {len(summary.errors) - MAX_ERRORS_SHOWN} more")
    return EXIT_FAILED_ITEMS if summary.failed else 0
