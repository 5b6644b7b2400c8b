"""Milvus boolean expressions built from values (never by pasting user text into quotes)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

# Ids per `id in [...]` expression: keeps each expression far below Milvus's size limits.
IDS_PER_EXPRESSION = 1000


def string_literal(value: str) -> str:
    """`value` as a Milvus string literal (double quotes, backslash escapes).

    Both Milvus 2.3 and Milvus Lite read JSON's escapes for quote, backslash, newline and
    tab; Milvus Lite rejects `\\uXXXX`, so non-ASCII text stays as it is and control
    characters other than newline and tab are refused upstream (`validation.check_id`).
    """
    return json.dumps(value, ensure_ascii=False)


def ids_in(ids: Sequence[str]) -> str:
    return "id in [" + ", ".join(string_literal(i) for i in ids) + "]"


def chunks(ids: Sequence[str], size: int = IDS_PER_EXPRESSION) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def all_of(*expressions: str) -> str:
    """The conjunction of the non-empty expressions, each parenthesized."""
    parts = [e.strip() for e in expressions if e.strip()]
    if len(parts) == 1:
        return parts[0]
    return " and ".join(f"({p})" for p in parts)


def excluding(ids: Sequence[str]) -> str:
    return f"not ({ids_in(ids)})" if ids else ""
