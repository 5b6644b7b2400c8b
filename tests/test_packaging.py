"""Rules of the package itself: generated code is current, the serving path stays light,
and the command line explains itself."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from clipsearch.client.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "protos"))
import generate  # noqa: E402  (protos/generate.py)


def test_committed_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert len(fresh) == 4
    for path in fresh:
        committed = ROOT / "protos" / "clipsearch" / "v1" / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale or was edited by hand: run `make proto`"
        )


def test_the_serving_path_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import clipsearch.server.app, clipsearch.server.service, clipsearch.server.encoder\n"
        "import clipsearch.server.commands, clipsearch.demo.run, clipsearch.client.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'transformers', 'optimum', 'onnx'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


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


@pytest.mark.parametrize("command", subcommands(build_parser()), ids=" ".join)
def test_every_subcommand_explains_itself(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: clipsearch {' '.join(command)}" in text
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 5, f"'{' '.join(command)} --help' says too little"
