"""Milvus boolean expressions built from values (never by pasting user text into quotes),
and the bounds a caller's filter must meet before any parser sees it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence

from clipsearch.server.errors import InvalidFilter
from clipsearch.server.limits import (
    MAX_FILTER_BOOLEAN_OPERATORS,
    MAX_FILTER_BYTES,
    MAX_FILTER_DEPTH,
)

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
    """The conjunction of the non-empty expressions, each parenthesized. A caller's filter
    must have passed `check_filter` (balanced), so its parentheses cannot close ours and it
    can never undo the other conditions."""
    parts = [e.strip() for e in expressions if e.strip()]
    if len(parts) == 1:
        return parts[0]
    return " and ".join(f"({p})" for p in parts)


def excluding(ids: Sequence[str]) -> str:
    return f"not ({ids_in(ids)})" if ids else ""


# Only what the bounds need: string literals (skipped whole), a lone quote (unclosed),
# words (keywords), brackets and the symbolic boolean operators. Everything else is left
# to the store's parser.
_FILTER_TOKEN = re.compile(
    r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|["']|[A-Za-z_][A-Za-z0-9_]*|&&|\|\||!=|[()\[\]!]""",
    re.DOTALL,
)
_CLOSING = {"(": ")", "[": "]"}
_BINARY_AFTER_NOT = frozenset({"in", "like"})


def shown(expression: str, limit: int = 80) -> str:
    """`expression` quoted for a message or a log line, shortened past `limit` characters."""
    if len(expression) <= limit:
        return repr(expression)
    return f"{expression[:limit]!r}... ({len(expression)} characters)"


def check_filter(expression: str) -> str:
    """A caller's filter checked against the bounds, without recursion: at most
    MAX_FILTER_BYTES UTF-8 bytes, parentheses and brackets balanced, quotes closed, at most
    MAX_FILTER_DEPTH levels of nesting (enclosing brackets plus the `not`s applying to a
    term) and MAX_FILTER_BOOLEAN_OPERATORS and/or. Returns it; raises InvalidFilter."""
    if not isinstance(expression, str):
        raise InvalidFilter("the filter must be a string")
    if not expression.strip():
        return expression
    _check_filter_size(expression)
    openers: list[str] = []
    nots: list[int] = [0]  # unary nots in force, per bracket level
    depth = operators = 0
    tokens = [m.group() for m in _FILTER_TOKEN.finditer(expression)]
    for index, token in enumerate(tokens):
        word = token.lower()
        if token in _CLOSING:
            openers.append(token)
            nots.append(0)
        elif token in (")", "]"):
            if not openers or _CLOSING[openers[-1]] != token:
                raise InvalidFilter(f"invalid filter {shown(expression)}: unbalanced {token!r}")
            openers.pop()
            depth -= nots.pop()
        elif token in ('"', "'"):
            raise InvalidFilter(f"invalid filter {shown(expression)}: unclosed {token} quote")
        elif word in ("and", "or", "&&", "||"):
            operators += 1
            depth -= nots[-1]
            nots[-1] = 0
        elif (word == "not" or token == "!") and not (
            index + 1 < len(tokens) and tokens[index + 1].lower() in _BINARY_AFTER_NOT
        ):
            nots[-1] += 1
            depth += 1
        if len(openers) + depth > MAX_FILTER_DEPTH:
            raise InvalidFilter(
                f"invalid filter {shown(expression)}: nested more than {MAX_FILTER_DEPTH} "
                "levels deep (parentheses, brackets and nots)"
            )
    if openers:
        raise InvalidFilter(f"invalid filter {shown(expression)}: unclosed {openers[-1]!r}")
    if operators > MAX_FILTER_BOOLEAN_OPERATORS:
        raise InvalidFilter(
            f"invalid filter {shown(expression)}: {operators} and/or operators, at most "
            f"{MAX_FILTER_BOOLEAN_OPERATORS} allowed (use `field in [...]` for long lists)"
        )
    return expression


def _check_filter_size(expression: str) -> None:
    if len(expression) <= MAX_FILTER_BYTES // 4:
        return
    try:
        size = len(expression.encode())
    except UnicodeEncodeError:  # a lone surrogate: only possible from Python callers
        raise InvalidFilter("the filter is not valid Unicode (a lone surrogate)") from None
    if size > MAX_FILTER_BYTES:
        raise InvalidFilter(
            f"the filter is {size} bytes long (UTF-8), at most {MAX_FILTER_BYTES} allowed"
        )
