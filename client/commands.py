"""Subcommands registered by this package (filled in as features land)."""

from __future__ import annotations

from typing import Any


def register(commands: Any) -> None:
    return None
