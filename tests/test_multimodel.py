"""Several models in one server, and the same query side by side against collections built
with different models: a real gRPC server on port 0, real Milvus Lite.

Two models are served, both on ONNX Runtime: the committed demo model (CLIP) and the
committed second demo model (Chinese-CLIP architecture, `server/models/demo-zh`). The tests
ask only what holds for any two distinct models; `fake_second_bundle` (the demo bundle under
another name, model id and dim, served by the deterministic fake backend) can stand in for
the second by changing the one line of `SECOND_MODEL`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_fixtures import ThreadedServer, quick_settings

from clipsearch.cli import main as cli_main
from clipsearch.client import AsyncClient, Client, FailedPrecondition, NotFound
from clipsearch.client.commands import display_width, format_comparison
from clipsearch.demo import grid
from clipsearch.demo.run import committed_models, run_demo
from clipsearch.export.demo_data import GalleryItem, generate_gallery
from clipsearch.server.app import Components, ServingBackend, default_components, served_bundle
from clipsearch.server.bundle import MANIFEST_FILE, default_bundle_path, load_bundle
from clipsearch.server.errors import ConfigurationError
from clipsearch.server.fake import FakeBackend
from clipsearch.server.settings import ModelSpec, Settings
from clipsearch.server.store import MilvusStore

DEMO = default_bundle_path()
FAKE_SECOND_ID = "second-fake-64"
FAKE_SECOND_DIM = 64
FOREIGN_ID = "someone-elses-model-v3"
N_GALLERY = 16
TOP_K = 3


def renamed_bundle(root: Path, name: str, model_id: str, dim: int | None = None) -> Path:
    """A bundle next to `root` with the demo model's files (linked) under another name and
    model id (and dim: then only a fake backend can serve it)."""
    manifest = json.loads((DEMO / MANIFEST_FILE).read_text(encoding="utf-8"))
    manifest.update(name=name, model_id=model_id, dim=dim or manifest["dim"])
    root.mkdir(parents=True)
    for path in DEMO.iterdir():
        if path.name != MANIFEST_FILE:
            (root / path.name).symlink_to(path)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return root


def fake_second_bundle(tmp: Path) -> Path:
    return renamed_bundle(tmp / "second", "second", FAKE_SECOND_ID, FAKE_SECOND_DIM)


def committed_second_bundle(tmp: Path) -> Path:
    return DEMO.parent / "demo-zh"


# The second model: the committed Chinese-CLIP demo model (or `fake_second_bundle`).
SECOND_MODEL: Callable[[Path], Path] = committed_second_bundle


def per_model_components() -> Components:
    """ONNX Runtime for real bundles, the fake backend for the fake second bundle."""
    real = default_components()

    def encoder(settings: Settings) -> ServingBackend:
        manifest = served_bundle(settings).manifest
        if manifest.model_id == FAKE_SECOND_ID:
            return FakeBackend.for_manifest(manifest)
        return real.encoder(settings)

    return Components(encoder=encoder, store=real.store)


@pytest.fixture(scope="module")
def second_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return SECOND_MODEL(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[GalleryItem]]:
    root = tmp_path_factory.mktemp("gallery")
    return root, generate_gallery(root, N_GALLERY, seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, second_path: Path) -> Iterator[ThreadedServer]:
    db = tmp_path_factory.mktemp("multimodel") / "store.db"
    settings = quick_settings(db, models=f"demo={DEMO},second={second_path}")
    # A collection built earlier with a model this server does not serve.
    store = MilvusStore.from_settings(settings)
    try:
        store.create_collection("foreign", 128, FOREIGN_ID)
    finally:
        store.close()
    with ThreadedServer(settings, per_model_components()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ThreadedServer) -> Iterator[Client]:
    with Client(server.address) as connected:
        yield connected


@pytest.fixture(scope="module")
def collections(client: Client, gallery: tuple[Path, list[GalleryItem]]) -> dict[str, str]:
    """A collection per model, each filled with the gallery: {model: collection}."""
    root, _ = gallery
    made = {}
    for model in ("demo", "second"):
        name = f"per_{model}"
        summary = client.ingest_path(
            root / "manifest.csv",
            caption_field="caption_en",
            collection=name,
            model=model,
            progress=False,
        )
        assert (summary.ok, summary.failed, summary.skipped) == (N_GALLERY, 0, 0)
        made[model] = name
    return made


def model_ids(client: Client) -> dict[str, str]:
    return {m.name: m.model_id for m in client.info().models}


# --- settings ----------------------------------------------------------------------------


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return Settings.from_args(parser.parse_args(argv), env)


def test_models_come_from_repeated_flags_or_the_environment_flags_winning() -> None:
    s = parse(["--model", "a=/m/a", "--model", "/m/b"], {})
    assert s.model_specs == (ModelSpec("a", "/m/a", "a=/m/a"), ModelSpec("", "/m/b", "/m/b"))
    env = {"CLIPSEARCH_MODELS": "x=/m/x, y=/m/y"}
    assert [spec.name for spec in parse([], env).model_specs] == ["x", "y"]
    assert [spec.name for spec in parse(["--model", "a=/m/a"], env).model_specs] == ["a"]
    assert parse([], {}).model_specs == (ModelSpec("", "", ""),)  # the demo model
    assert parse(["--model", "/m/one"], {}).model == "/m/one"  # the single-model spelling
    one = Settings(models="a=/m/a,b=/m/b").for_model(ModelSpec("b", "/m/b", "b=/m/b"))
    assert (one.model, one.models, served_spec(one)) == ("b=/m/b", "", "/m/b")


def served_spec(settings: Settings) -> str:
    return settings.model_specs[0].path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": "a=/x", "models": "b=/y"}, "give model or models, not both"),
        ({"models": "a=/x,a=/y"}, "model name 'a' is given twice"),
        ({"model": "bad name=/x"}, "give NAME=DIR or DIR"),
        ({"model": "a="}, "give NAME=DIR or DIR"),
    ],
)
def test_bad_model_lists_are_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings(**values)


def test_two_models_with_one_model_id_are_refused_at_start_up(
    tmp_path: Path, second_path: Path
) -> None:
    settings = quick_settings(tmp_path / "x.db", models=f"one={second_path},two={second_path}")
    server = ThreadedServer(settings, per_model_components())
    with pytest.raises(ConfigurationError, match="same model_id"):
        server.start()
    server.close()


# --- Info and Encode ---------------------------------------------------------------------


def test_info_lists_every_model_with_its_memory_and_start_up(
    client: Client, second_path: Path
) -> None:
    info = client.info()
    second = load_bundle(second_path).manifest
    assert [(m.name, m.is_default) for m in info.models] == [("demo", True), ("second", False)]
    assert [(m.model_id, m.dim) for m in info.models] == [
        (load_bundle(DEMO).manifest.model_id, 128),
        (second.model_id, second.dim),
    ]
    assert (info.model_name, info.model_id, info.dim) == ("demo", info.models[0].model_id, 128)
    demo = info.model("demo")
    assert (demo.family, demo.precision, demo.providers[0]) == (
        "clip",
        "fp32",
        "CPUExecutionProvider",
    )
    assert [m.family for m in info.models] == ["clip", second.family]
    for model, path in zip(info.models, (DEMO, second_path), strict=True):
        assert 0 < model.startup_us < 120e6
        if model.precision != "fake":  # ONNX Runtime holds the weights; the fake has none
            variant = load_bundle(path).manifest.variants[model.precision]
            weights = sum(
                (path / f).stat().st_size for f in (variant.text_file, variant.vision_file)
            )
            assert model.memory_bytes >= weights > 2**20


def test_each_model_encodes_with_its_own_towers(
    client: Client, gallery: tuple[Path, list[GalleryItem]]
) -> None:
    texts = ["a red circle", "红色的圆形", "a blue square and a yellow star", ""]
    root, items = gallery
    images = [(root / item.path).read_bytes() for item in items[:3]]
    dims = {m.name: m.dim for m in client.info().models}
    by_model = {}
    for model in ("demo", "second"):
        batch = client.encode_texts(texts, model=model)
        pictures = client.encode_images(images, model=model)
        assert (batch.model, pictures.model) == (model, model)
        assert batch.vectors.shape == (len(texts), dims[model])
        assert pictures.vectors.shape == (len(images), dims[model])
        for i, text in enumerate(texts):  # batch == single, per model
            single = client.encode_texts([text], model=model).vectors[0]
            np.testing.assert_allclose(batch.vectors[i], single, atol=1e-5)
        single_image = client.encode_images([images[1]], model=model).vectors[0]
        np.testing.assert_allclose(pictures.vectors[1], single_image, atol=1e-5)
        (streamed,) = list(client.encode_stream([texts], model=model))
        assert streamed.model == model
        np.testing.assert_allclose(streamed.vectors, batch.vectors, atol=1e-5)
        by_model[model] = batch.vectors
    default = client.encode_texts(texts)
    assert default.model == "demo"
    np.testing.assert_array_equal(default.vectors, by_model["demo"])
    a, b = by_model["demo"], by_model["second"]
    assert a.shape != b.shape or not np.allclose(a, b, atol=1e-3)
    with pytest.raises(NotFound, match="no model 'nope' is served here; served: demo, second"):
        client.encode_texts(["x"], model="nope")


def test_the_command_line_passes_the_model_on(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ["--server", client.address]
    assert cli_main(["profile", "x", "--encode", "--model", "second", *server]) == 0
    assert "Encode text 'x'" in capsys.readouterr().out
    assert cli_main(["profile", "x", "--encode", "--model", "nope", *server]) == 1
    assert "NOT_FOUND: no model 'nope' is served here" in capsys.readouterr().err
    assert cli_main(["profile", "x", "--model", "second", *server]) == 1
    assert "a search uses its collection's model" in capsys.readouterr().err
    create = ["collections", "create", "made_for_second", "--model", "second", *server]
    assert cli_main(create) == 0
    assert capsys.readouterr().out == "created made_for_second\n"
    assert cli_main(["collections", "--json", *server]) == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert (listed["made_for_second"]["model"], listed["made_for_second"]["dim"]) == (
        "second",
        client.info().model("second").dim,
    )
    client.drop_collection("made_for_second")


# --- collections per model ---------------------------------------------------------------


def test_ingest_and_search_use_the_collections_model(
    client: Client, collections: dict[str, str], gallery: tuple[Path, list[GalleryItem]]
) -> None:
    root, items = gallery
    ids = model_ids(client)
    listed = {c.name: c for c in client.list_collections()}
    for model, name in collections.items():
        info = listed[name]
        assert (info.model, info.model_id, info.count) == (model, ids[model], N_GALLERY)
        stored = client.get([item.id for item in items], include_vectors=True, collection=name)
        assert len(stored) == N_GALLERY
        # The stored vectors are this model's: what Encode with it gives for the same files.
        encoded = client.encode_images([root / item.path for item in items], model=model)
        stored_vectors = np.stack([item.image_vector for item in stored])  # type: ignore[misc]
        np.testing.assert_allclose(stored_vectors, encoded.vectors, atol=1e-5)
        # A text search encodes the query with the collection's model.
        result = client.search("a red circle", collection=name, top_k=TOP_K)
        assert result.model == model and len(result.hits) == TOP_K
        query = client.encode_texts(["a red circle"], model=model).vectors[0]
        scores = stored_vectors @ query
        best = np.argsort(-scores)[:TOP_K]
        assert [hit.id for hit in result.hits] == [stored[i].id for i in best]
        np.testing.assert_allclose([h.score for h in result.hits], scores[best], atol=1e-4)


def test_ingest_naming_no_model_uses_the_collections_own(
    client: Client, collections: dict[str, str], gallery: tuple[Path, list[GalleryItem]]
) -> None:
    from clipsearch.client import IngestItem

    root, items = gallery
    image = (root / items[0].path).read_bytes()
    summary = client.ingest(
        [IngestItem(id="extra", image=image)], collection=collections["second"]
    ).run()
    assert (summary.ok, summary.failed) == (1, 0)
    (stored,) = client.get(["extra"], include_vectors=True, collection=collections["second"])
    expected = client.encode_images([image], model="second").vectors[0]
    assert stored.image_vector is not None
    np.testing.assert_allclose(stored.image_vector, expected, atol=1e-5)
    client.delete(["extra"], collection=collections["second"])


def test_a_collection_of_another_model_is_refused_naming_both(
    client: Client, collections: dict[str, str], gallery: tuple[Path, list[GalleryItem]]
) -> None:
    from clipsearch.client import IngestItem

    ids = model_ids(client)
    # Built with a model the server does not serve.
    with pytest.raises(FailedPrecondition) as refused:
        client.search("a red circle", collection="foreign")
    assert FOREIGN_ID in refused.value.message
    assert ids["demo"] in refused.value.message and ids["second"] in refused.value.message
    with pytest.raises(FailedPrecondition, match=FOREIGN_ID):
        client.count(collection="foreign")
    # Built with one served model, asked for with the other.
    root, items = gallery
    item = IngestItem(id="x", image=(root / items[0].path).read_bytes())
    for attempt in (
        lambda: client.ingest([item], collection=collections["second"], model="demo").run(),
        lambda: client.create_collection(collections["second"], exist_ok=True, model="demo"),
    ):
        with pytest.raises(FailedPrecondition) as refused:
            attempt()
        assert ids["demo"] in refused.value.message and ids["second"] in refused.value.message
    assert client.count(collection=collections["second"]) == N_GALLERY
    assert client.create_collection(collections["second"], exist_ok=True, model="second") is False
    with pytest.raises(NotFound, match="no model 'nope'"):
        client.create_collection("new_one", model="nope")


# --- side by side ------------------------------------------------------------------------


def test_compare_runs_one_query_against_each_collection(
    client: Client, server: ThreadedServer, collections: dict[str, str]
) -> None:
    names = [collections["demo"], collections["second"]]
    comparison = client.compare("a red circle", collections=names, top_k=TOP_K)
    assert [(r.collection, r.model) for r in comparison.results] == [
        (names[0], "demo"),
        (names[1], "second"),
    ]
    for r in comparison.results:
        alone = client.search("a red circle", collection=r.collection, top_k=TOP_K)
        assert [h.id for h in r.result.hits] == [h.id for h in alone.hits]
        assert r.round_trip_us >= r.result.timing.total_us > 0
    assert comparison[names[1]].model == "second"

    async def from_the_async_face() -> list[list[str]]:
        async with AsyncClient(server.address) as aclient:
            other = await aclient.compare("a red circle", collections=names, top_k=TOP_K)
        return [[h.id for h in r.result.hits] for r in other.results]

    expected = [[h.id for h in r.result.hits] for r in comparison.results]
    assert asyncio.run(from_the_async_face()) == expected


def test_compare_command_prints_columns_json_and_a_grid(
    client: Client,
    collections: dict[str, str],
    gallery: tuple[Path, list[GalleryItem]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = [collections["demo"], collections["second"]]
    expected = client.compare("a red circle", collections=names, top_k=TOP_K)
    png = tmp_path / "compare.png"
    common = ["--collections", ",".join(names), "--top-k", str(TOP_K), "--server", client.address]
    assert cli_main(["compare", "a red circle", *common, "--grid", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"text 'a red circle' -> image, top {TOP_K}"
    assert re.fullmatch(rf"\s+{names[0]} \[demo\]\s+{names[1]} \[second\]", lines[1])
    for rank in range(1, TOP_K + 1):  # rank, then each collection's hit in its column
        row = lines[2 + rank]
        left, right = (r.result.hits[rank - 1] for r in expected.results)
        assert row.split()[0] == str(rank)
        assert row.index(left.id) < row.index(right.id, row.index(left.id) + len(left.id))
        assert f"{left.score:6.3f}".strip() in row and f"{right.score:6.3f}".strip() in row
    assert lines[3 + TOP_K].split()[0] == "server" and lines[4 + TOP_K].startswith("round trip")
    assert lines[-1] == f"grid: {png}"
    with Image.open(png) as picture:
        cell = grid.THUMB + 2 * grid.PAD
        assert picture.size == (grid.LABEL_WIDTH + (1 + TOP_K) * cell, 2 * cell)

    root, items = gallery
    query = root / items[0].path
    assert cli_main(["compare", "--image", str(query), *common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["query"] == f"image {str(query)!r}"
    assert [(c["collection"], c["model"]) for c in data["collections"]] == [
        (names[0], "demo"),
        (names[1], "second"),
    ]
    for column in data["collections"]:  # the query image itself is stored: it comes first
        assert len(column["hits"]) == TOP_K and column["hits"][0]["id"] == items[0].id
    assert cli_main(["compare", *common]) == 2
    assert "give exactly one query" in capsys.readouterr().err


def test_format_comparison_keeps_columns_aligned_with_wide_characters(
    client: Client, collections: dict[str, str]
) -> None:
    names = [collections["demo"], collections["second"]]
    comparison = client.compare("红色的圆形", collections=names, top_k=TOP_K)
    lines = format_comparison(comparison, limit=30).splitlines()
    hit_rows = lines[3 : 3 + TOP_K]
    second = comparison.results[1].result.hits
    starts = {
        display_width(row[: row.index(f"{hit.score:6.3f}  {hit.id}")])
        for row, hit in zip(hit_rows, second, strict=True)
    }
    assert len(starts) == 1  # the second column starts at one screen column on every row
    assert all(display_width(row) <= len("round trip") + 3 + 30 + 3 + 30 for row in hit_rows)


# --- the demo ----------------------------------------------------------------------------


def test_the_demo_uses_every_committed_model_and_compares_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    committed = committed_models()
    assert committed[0] == ("demo", DEMO)
    assert {name for name, _ in committed} == {
        p.name for p in DEMO.parent.iterdir() if (p / MANIFEST_FILE).is_file()
    }
    twin = renamed_bundle(tmp_path / "models" / "twin", "twin", "demo-twin-v1")
    models = [*committed, ("twin", twin)]
    assert run_demo(tmp_path / "out", n=120, top_k=3, seed=7, models=models) == 0
    out = capsys.readouterr().out
    names = [name for name, _ in models]
    assert f"one query, {len(models)} models side by side ({', '.join(names)})" in out
    assert "demo [demo]" in out and "demo_twin [twin]" in out
    assert "7. server stopped (exit code 0)" in out
    with Image.open(tmp_path / "out" / "results.png") as picture:
        from clipsearch.demo.run import QUERIES

        assert picture.size[1] == (len(QUERIES) + len(models)) * (grid.THUMB + 2 * grid.PAD)
