"""The `clipsearch` command line: argument parsing, every subcommand's help, the hit table,
and the commands against a real server on port 0 (in a subprocess where the process itself
is under test: a reader that closes the pipe)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_fixtures import ThreadedServer, quick_settings, served_model

from clipsearch.cli import EXIT_BROKEN_PIPE, build_parser, main
from clipsearch.client import commands
from clipsearch.client.sources import ItemSource
from clipsearch.client.types import Hit, SearchResult, Timing

CLIENT_COMMANDS = ("ingest", "search", "profile", "count", "get", "delete", "collections", "info")
LONG_IDS = [
    "photos/2024/holiday-in-the-mountains/IMG_20240812_153045_HDR.jpg",
    "photos/2024/holiday-in-the-mountains/IMG_20240812_153112_HDR.jpg",
    "scans/family-archive/box-07/grandparents-wedding-1962-front.png",
]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- parsing and help --------------------------------------------------------------------


def subcommands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += subcommands(sub, (*prefix, name))
    return found


def test_the_client_commands_are_all_registered() -> None:
    assert set(CLIENT_COMMANDS) <= {command[0] for command in subcommands(build_parser())}


@pytest.mark.parametrize("command", subcommands(build_parser()), ids=" ".join)
def test_every_subcommand_explains_itself(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: clipsearch {' '.join(command)}" in text
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 5, f"'{' '.join(command)} --help' says too little"
    if command[0] in CLIENT_COMMANDS:
        assert "--server HOST:PORT" in text and "--token" in text


def test_serve_shows_the_settings_with_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[env CLIPSEARCH_PORT, default 50051]" in text
    assert "--ready-file READY_FILE" in text
    args = build_parser().parse_args(["serve", "--port", "0", "--ready-file", "r.txt"])
    assert (args.port, args.ready_file, args.host) == (0, Path("r.txt"), None)


def test_cli_search_arguments() -> None:
    args = build_parser().parse_args(
        ["search", "a red circle", "--target", "both", "--top-k", "5", "--offset", "10",
         "--filter", 'metadata["k"] == 1', "--collection", "demo", "--param", "ef=64",
         "--server", "host:1", "--token", "t", "--timeout", "2", "--json"]
    )  # fmt: skip
    assert (args.command, args.text, args.target, args.top_k, args.offset) == (
        "search",
        "a red circle",
        "both",
        5,
        10,
    )
    assert (args.collection, args.server, args.token, args.timeout, args.json) == (
        "demo",
        "host:1",
        "t",
        2.0,
        True,
    )
    assert commands.parse_params(args.param) == {"ef": 64.0}
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        commands.parse_params(["ef"])


def test_cli_connection_defaults_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLIPSEARCH_SERVER", "search.internal:6000")
    monkeypatch.setenv("CLIPSEARCH_TOKEN", "from-env")
    args = build_parser().parse_args(["count"])
    assert (args.server, args.token, args.timeout) == ("search.internal:6000", "from-env", 30.0)
    monkeypatch.delenv("CLIPSEARCH_SERVER")
    monkeypatch.delenv("CLIPSEARCH_TOKEN")
    args = build_parser().parse_args(["count"])
    assert (args.server, args.token) == ("127.0.0.1:50051", None)


def test_cli_query_must_be_exactly_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--server", "127.0.0.1:9"]) == 2
    assert main(["search", "text", "--like", "x", "--server", "127.0.0.1:9"]) == 2
    expected = (
        "clipsearch search: give exactly one query: TEXT, --image FILE, --like ID or "
        "--vector-file FILE"
    )
    assert capsys.readouterr().err.splitlines() == [expected, expected]


def test_cli_collections_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["collections"])
    assert (args.action, args.name) == ("list", None)
    args = build_parser().parse_args(["collections", "create", "photos", "--exist-ok"])
    assert (args.action, args.name, args.exist_ok) == ("create", "photos", True)
    assert main(["collections", "drop", "--server", "127.0.0.1:9"]) == 2
    assert "collections drop needs a collection NAME" in capsys.readouterr().err


def test_cli_reads_vector_files(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.array([[1.0, 2.0]]))
    (tmp_path / "v.json").write_text("[0.5, -1]")
    (tmp_path / "v.txt").write_text("1, 2\n3")
    (tmp_path / "bad.txt").write_text("1 two")
    np.testing.assert_array_equal(commands.read_vector_file(tmp_path / "v.npy"), [1, 2])
    np.testing.assert_array_equal(commands.read_vector_file(tmp_path / "v.json"), [0.5, -1])
    np.testing.assert_array_equal(commands.read_vector_file(tmp_path / "v.txt"), [1, 2, 3])
    with pytest.raises(ValueError, match="not a list of numbers"):
        commands.read_vector_file(tmp_path / "bad.txt")


def test_hit_table_aligns_wide_characters() -> None:
    result = SearchResult(
        hits=[
            Hit("a", 0.91234, "/img/a.jpg", "红色的圆形", {}),
            Hit("bb", 0.5, "/img/b.jpg", "a red circle", {}),
        ],
        query_truncated=False,
        timing=Timing(
            queue_us=100, preprocess_us=200, inference_us=3000, search_us=1000, total_us=4500
        ),
    )
    lines = commands.format_hits(result, first_rank=11).splitlines()
    assert lines[0].split() == ["rank", "score", "id", "caption", "uri"]
    assert lines[1].split() == ["11", "0.9123", "a", "红色的圆形", "/img/a.jpg"]
    assert lines[2].split() == ["12", "0.5000", "bb", "a", "red", "circle", "/img/b.jpg"]
    # The uri column starts at the same terminal column in every row.
    columns = [commands.display_width(line[: line.index("/img")]) for line in lines[1:3]]
    assert columns[0] == columns[1]
    assert lines[3] == (
        "timing: server 4.50 ms (queue 0.10, preprocess 0.20, inference 3.00, "
        "search 1.00 ms; batch 0)"
    )


def test_serve_refuses_bad_settings_on_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPSEARCH_PORT", "eighty")
    code, out, err = run_cli(capsys, "serve")
    assert (code, out) == (2, "")
    assert err.startswith("clipsearch serve: CLIPSEARCH_PORT='eighty' is not a valid port")


def test_hit_table_shows_ids_and_uris_whole_and_the_fields_asked_for() -> None:
    hits = [
        Hit(LONG_IDS[0], 0.9, "/srv/" + LONG_IDS[0], "a mountain lake " * 6, {"n": 1}),
        Hit("b", 0.5, "/srv/b.jpg", "", {}),
    ]
    result = SearchResult(hits=hits, query_truncated=False, timing=Timing())
    lines = commands.format_hits(result).splitlines()
    assert lines[1].split()[2] == LONG_IDS[0] and lines[1].endswith(" /srv/" + LONG_IDS[0])
    assert lines[1].split()[3:6] == ["a", "mountain", "lake"] and "…" in lines[1]  # cut
    lines = commands.format_hits(result, fields=["metadata", "uri"]).splitlines()
    assert lines[0].split() == ["rank", "score", "id", "metadata", "uri"]
    assert lines[1].split()[2:] == [LONG_IDS[0], '{"n":', "1}", "/srv/" + LONG_IDS[0]]
    assert lines[2].split()[2:] == ["b", "/srv/b.jpg"]


# --- against a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    db = tmp_path_factory.mktemp("cli") / "clipsearch.db"
    with ThreadedServer(quick_settings(db, served_model())) as running:
        yield running


def write_images(folder: Path, names: list[str]) -> None:
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), (40 * k, 200 - 40 * k, 90)).save(path)


def write_manifest(folder: Path, lines: list[str]) -> Path:
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return manifest


@pytest.fixture(scope="module")
def long_ids(server: ThreadedServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A collection of three items with long ids (path-like, over 60 characters)."""
    folder = tmp_path_factory.mktemp("long-ids")
    write_images(folder, LONG_IDS)
    rows = [
        json.dumps({"id": name, "path": name, "caption": f"picture {k}", "n": k})
        for k, name in enumerate(LONG_IDS)
    ]
    code = main(["ingest", str(write_manifest(folder, rows)), "--collection", "long_ids",
                 "--quiet", "--server", server.address])  # fmt: skip
    assert code == 0
    return "long_ids"


def test_search_shows_ids_that_get_accepts(
    server: ThreadedServer, long_ids: str, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ("--server", server.address, "--collection", long_ids)
    code, out, _ = run_cli(capsys, "search", "a picture", *at)
    assert code == 0
    shown = [line.split()[2] for line in out.splitlines()[1:-1]]
    assert sorted(shown) == sorted(LONG_IDS)
    code, out, err = run_cli(capsys, "get", shown[0], *at)
    assert (code, err) == (0, "")
    assert json.loads(out)["id"] == shown[0]


def test_search_output_fields(
    server: ThreadedServer, long_ids: str, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ("--server", server.address, "--collection", long_ids)
    code, out, _ = run_cli(capsys, "search", "a picture", "--output-fields", "uri", "--json", *at)
    assert code == 0
    hits = json.loads(out)["hits"]
    assert [set(hit) for hit in hits] == [{"id", "score", "uri"}] * 3
    assert all(hit["uri"].endswith(hit["id"]) for hit in hits)

    code, out, _ = run_cli(
        capsys, "search", "a picture", "--output-fields", "caption,metadata", *at
    )
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "score", "id", "caption", "metadata"]
    rows = {line.split()[2]: line.split()[3:] for line in lines[1:-1]}
    assert rows[LONG_IDS[1]] == ["picture", "1", '{"n":', "1}"]
    assert "/" + LONG_IDS[1] not in out  # no uri asked for, none shown

    code, out, err = run_cli(capsys, "search", "a picture", "--output-fields", "size", *at)
    assert (code, out) == (1, "")
    assert err.startswith("clipsearch search: INVALID_ARGUMENT: ") and "size" in err


def test_a_malformed_manifest_line_is_a_failed_item_and_the_rest_is_written(
    server: ThreadedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path, ["a.png", "c.png"])
    manifest = write_manifest(
        tmp_path,
        [
            '{"id": "a", "path": "a.png"}',
            '{"id": "b", "path": ',
            '{"id": "c", "path": "c.png"}',
        ],
    )
    at = ("--server", server.address, "--collection", "bad_line")
    code, out, err = run_cli(capsys, "ingest", str(manifest), "--quiet", *at)
    lines = out.splitlines()
    assert (code, err) == (1, "")
    assert lines[0].startswith("2 ok, 1 failed, 0 skipped (3 items in ")
    assert lines[1:] == [
        "failed:",
        f"  {manifest}:2: not valid JSON: Expecting value at column 21",
    ]
    assert run_cli(capsys, "count", *at)[:2] == (0, "2\n")


def test_an_ingest_that_stops_early_still_says_what_it_wrote(
    server: ThreadedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_images(tmp_path, ["a.png", "b.png"])
    manifest = write_manifest(
        tmp_path, ['{"id": "a", "path": "a.png"}', '{"id": "b", "path": "b.png"}']
    )
    readable = ItemSource.__iter__

    def then_the_disk_goes(source: ItemSource) -> Iterator[object]:
        yield from readable(source)
        raise OSError("the disk went away")

    monkeypatch.setattr(ItemSource, "__iter__", then_the_disk_goes)
    at = ("--server", server.address, "--collection", "stopped")
    code, out, err = run_cli(capsys, "ingest", str(manifest), "--quiet", *at)
    assert (code, err) == (2, "clipsearch ingest: the disk went away\n")
    lines = out.splitlines()
    assert lines[0].startswith("2 ok, 0 failed, 0 skipped (2 items in ")
    assert lines[1:] == [f"stopped before the end of {manifest}"]


def run_into_a_closed_pipe(*argv: str, unbuffered: bool) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a stdout whose reader is already gone, as `| head -1` leaves it."""
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    try:
        return subprocess.run(
            [sys.executable, "-m", "clipsearch", *argv],
            stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write)


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_a_reader_that_leaves_early_ends_the_command_quietly(
    server: ThreadedServer, unbuffered: bool
) -> None:
    info = run_into_a_closed_pipe("info", "--server", server.address, unbuffered=unbuffered)
    assert (info.returncode, info.stderr) == (EXIT_BROKEN_PIPE, "")
    if not unbuffered:
        usage = run_into_a_closed_pipe("--help", unbuffered=False)
        assert (usage.returncode, usage.stderr) == (EXIT_BROKEN_PIPE, "")
