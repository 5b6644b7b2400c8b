"""`clipsearch demo`: the whole service on its embedded defaults, in one command.

Generates the demo gallery, starts `clipsearch serve` (demo model, Milvus Lite) in a child
process, streams the gallery in with a progress bar, asks queries in all four directions in
English and Chinese, prints the hits with their timings and whether each hit is right, writes
a result grid PNG, and stops the server cleanly.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from clipsearch.client import Client, Target
from clipsearch.demo.grid import GridRow, Mark, write_grid
from clipsearch.export.demo_data import GalleryItem, generate_gallery, read_manifest
from clipsearch.server.process import ServerProcess

COLLECTION = "demo"
# Called with the running server's address and the gallery folder once the queries are done;
# it returns when the demo may stop (`clipsearch demo --web` serves the page until Ctrl-C).
Hold = Callable[[str, Path], None]


@dataclass(frozen=True)
class DemoQuery:
    direction: str
    label: str  # ASCII, for the grid (the default PIL font has no CJK glyphs)
    expect: tuple[str, str]  # (colour, shape) every good hit shows
    text: str | None = None
    image_of: tuple[str, str] | None = None  # query with a gallery image of (colour, shape)
    like_first_hit: bool = False  # "more like this" on the first query's top hit
    target: Target = "image"
    filter: str = ""


QUERIES = (
    DemoQuery("text → image", '"a red circle"', ("red", "circle"), text="a red circle"),
    DemoQuery("text → image", "[zh] red circle", ("red", "circle"), text="红色的圆形"),
    DemoQuery("text → image", '"blue square"', ("blue", "square"), text="blue square"),
    DemoQuery("text → image", "[zh] yellow star", ("yellow", "star"), text="黄色的五角星"),
    DemoQuery(
        "text → text", '"a green triangle"', ("green", "triangle"),
        text="a green triangle", target="caption",
    ),
    DemoQuery(
        "image → image", "image: purple star", ("purple", "star"), image_of=("purple", "star"),
    ),
    DemoQuery(
        "image → text", "image: orange circle", ("orange", "circle"),
        image_of=("orange", "circle"), target="caption",
    ),
    DemoQuery("more like this", "like: top red circle", ("red", "circle"), like_first_hit=True),
    DemoQuery(
        "text → image + filter", '"a star", dark background', ("", "star"),
        text="a star", filter='metadata["background"] == "dark"',
    ),
    DemoQuery(
        "text → both (RRF)", '"an orange triangle"', ("orange", "triangle"),
        text="an orange triangle", target="both",
    ),
)  # fmt: skip


def hit_matches(metadata: dict[str, object], expect: tuple[str, str]) -> bool:
    colour, shape = expect
    objects = [(metadata.get("colour"), metadata.get("shape"))]
    if metadata.get("shape2"):
        objects.append((metadata.get("colour2"), metadata.get("shape2")))
    return any((not colour or c == colour) and s == shape for c, s in objects)


def run_demo(out: Path, n: int, top_k: int, seed: int, hold: Hold | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    gallery = out / "gallery"
    started = time.perf_counter()
    generate_gallery(gallery, n, seed=seed)
    items = read_manifest(gallery)
    seconds = time.perf_counter() - started
    print(f"1. generated {len(items)} demo images in {gallery} ({seconds:.1f} s)")

    server = ServerProcess(["--milvus-uri", str(out / "demo.db"), "--log-level", "warning"])
    print("2. starting clipsearch serve (demo model, Milvus Lite) ...")
    address = server.start()
    try:
        with Client(address, timeout=60) as client:
            info = client.info()
            print(
                f"   serving {info.model_name} (dim {info.dim}, {info.text.precision}, "
                f"{info.text.providers[0]}) on {address}"
            )
            if COLLECTION in {c.name for c in client.list_collections()}:
                client.drop_collection(COLLECTION)
            print(f"3. ingesting {gallery / 'manifest.csv'} ...")
            started = time.perf_counter()
            summary = client.ingest_path(
                gallery / "manifest.csv", caption_field="caption_en", collection=COLLECTION
            )
            seconds = time.perf_counter() - started
            print(
                f"   {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped in "
                f"{seconds:.1f} s ({summary.ok / max(seconds, 1e-9):.0f} images/s); "
                f"count = {client.count(collection=COLLECTION)}"
            )
            if summary.failed:
                print(f"   errors: {summary.errors[:5]}", file=sys.stderr)
                return 1
            rows, precision = ask_queries(client, gallery, items, top_k)
            grid_path = write_grid(out / "results.png", rows)
            print(f"5. result grid: {grid_path}")
            print("6. where the time of one search goes:")
            print(client.profile("a red circle", collection=COLLECTION, repeat=5).render())
        if hold is not None:
            hold(address, gallery)
    finally:
        code = server.stop()
        print(f"{8 if hold else 7}. server stopped (exit code {code})")
    print(f"mean precision@{top_k} over the queries (of the images that exist): {precision:.2f}")
    return 0 if code == 0 else 1


def ask_queries(
    client: Client, gallery: Path, items: list[GalleryItem], top_k: int
) -> tuple[list[GridRow], float]:
    print(f"4. queries (top {top_k}; ✓ right, ✗ wrong, · the gallery has no more such images)")
    rows: list[GridRow] = []
    precisions = []
    first_top = ""
    for query in QUERIES:
        query_image = None
        if query.image_of is not None:
            source = next(
                i for i in items if (i.colour, i.shape) == query.image_of and i.n_objects == 1
            )
            query_image = gallery / source.path
        result = client.search(
            query.text,
            image=query_image.read_bytes() if query_image is not None else None,
            like=first_top if query.like_first_hit else None,
            target=query.target,
            top_k=top_k,
            filter=query.filter,
            collection=COLLECTION,
        )
        if not first_top and result.hits:
            first_top = result.hits[0].id
        # Only so many gallery images show the asked object: past that count, a hit can't be right.
        available = sum(hit_matches(asdict(item), query.expect) for item in items)
        available -= 1 if (query.like_first_hit or query_image is not None) else 0
        marks = [
            Mark.RIGHT if hit_matches(hit.metadata, query.expect)
            else Mark.NONE_LEFT if rank > available
            else Mark.WRONG
            for rank, hit in enumerate(result.hits, start=1)
        ]  # fmt: skip
        expected = min(len(result.hits), max(available, 0))
        precisions.append(marks.count(Mark.RIGHT) / expected if expected else 1.0)
        shown = query.text if query.text is not None else query.label
        print(f"\n   {query.direction}: {shown}   [{result.timing.summary(digits=1)}]")
        for rank, (hit, mark) in enumerate(zip(result.hits, marks, strict=True), start=1):
            print(f"     {rank}. {mark.value} {hit.score:6.3f}  {hit.id}  {hit.caption}")
        rows.append(
            GridRow(
                label=f"{query.direction.replace('→', '->')}: {query.label}",
                query_image=query_image,
                hits=[Path(h.uri) for h in result.hits],
                marks=marks,
            )
        )
    return rows, sum(precisions) / len(precisions)


def main(args: argparse.Namespace, hold: Hold | None = None) -> int:
    return run_demo(Path(args.out), args.n, args.top_k, args.seed, hold)
