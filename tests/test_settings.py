"""The one settings object: flag > environment > default, validation, and its docs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from clipsearch.server.errors import ConfigurationError
from clipsearch.server.settings import Settings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "SETTINGS.md"


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return Settings.from_args(parser.parse_args(argv), env)


def test_defaults_need_no_environment() -> None:
    s = parse([], {})
    assert (s.host, s.port, s.milvus_uri) == ("127.0.0.1", 50051, "./clipsearch.db")
    assert s.providers == ("cpu",) and s.uses_milvus_lite


def test_flag_beats_environment_beats_default() -> None:
    env = {"CLIPSEARCH_PORT": "6000", "CLIPSEARCH_MAX_WAIT_MS": "2.5", "CLIPSEARCH_WARMUP": "no"}
    s = parse(["--port", "7000"], env)
    assert s.port == 7000  # flag
    assert s.max_wait_ms == 2.5  # environment
    assert s.warmup is False  # environment, boolean spelling
    assert s.max_batch_size == 32  # default
    assert parse(["--warmup"], env).warmup is True


def test_every_field_has_a_flag_and_an_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    names = set(Settings.__dataclass_fields__)
    assert flags == names
    for name in names:
        assert Settings.env_name(name) == "CLIPSEARCH_" + name.upper()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLIPSEARCH_PORT": "eighty"}, "CLIPSEARCH_PORT='eighty' is not a valid port"),
        ({"CLIPSEARCH_WARMUP": "maybe"}, "expected true/false"),
        ({"CLIPSEARCH_PRECISION": "fp8"}, "precision='fp8' is not one of"),
        ({"CLIPSEARCH_MAX_BATCH_SIZE": "0"}, "max_batch_size must be > 0"),
        ({"CLIPSEARCH_DEVICE": "tpu"}, "device='tpu'"),
    ],
)
def test_bad_values_are_refused_with_the_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_device_list_and_remote_milvus() -> None:
    s = Settings(device="cuda, cpu", milvus_uri="http://milvus:19530")
    assert s.providers == ("cuda", "cpu")
    assert not s.uses_milvus_lite


def test_docs_list_every_setting_with_its_default() -> None:
    assert Settings.documentation() in DOCS.read_text(encoding="utf-8"), (
        "docs/SETTINGS.md is stale: regenerate the table with "
        "python -c 'from clipsearch.server.settings import Settings; "
        "print(Settings.documentation())'"
    )
