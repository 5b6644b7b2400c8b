"""A subset of Milvus boolean expressions, evaluated in Python for `InMemoryStore`.

Understood:
  - fields `id`, `uri`, `caption` (strings) and `metadata["key"]...` (a JSON path of string
    keys and integer indexes);
  - `field == != < <= > >= literal`, the literal a string ("..." or '...', escapes \\" \\'
    \\\\ \\n \\t), a number, true or false;
  - `field [not] in ["a", "b", ...]` on id, uri and caption (strings only);
  - `field like "pattern"`, `%` matching any run of characters and `_` any one character;
  - `and`/`&&`, `or`/`||`, `not`/`!`, parentheses, `true`, `false`; keywords in any case.

Semantics follow Milvus Lite (tests/test_store_contract.py runs the same expressions on both):
a missing or null JSON value is unknown, and and/or/not use three-valued logic (an item
matches only if the whole expression is true); a JSON value of another type than the
literal is unequal to it and neither less nor greater (true and false count as 1 and 0);
comparing a string field with a non-string is an error.

Anything else raises InvalidFilter, the error the Milvus store raises for a filter it cannot
parse, even where Milvus would accept it (arithmetic, json_contains and other functions,
`in` on JSON values, chained comparisons).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from clipsearch.server.errors import InvalidFilter

# A row's fields: id, uri, caption (str) and metadata (a JSON object).
Row = Mapping[str, Any]
# True, False, or None for unknown (a missing or null JSON value was compared).
Predicate = Callable[[Row], bool | None]

STRING_FIELDS = ("id", "uri", "caption")
JSON_FIELD = "metadata"
_HINT = "the in-memory store understands a subset of Milvus filters (see memory_filters)"

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!()\[\],])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t"}
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_KEYWORDS = frozenset({"and", "or", "not", "in", "like", "true", "false"})


@dataclass(frozen=True)
class _Token:
    kind: str  # string, number, name, keyword, op, end
    text: str
    value: Any
    column: int


def compile_filter(expression: str) -> Predicate:
    """`expression` as a predicate on rows; the empty expression matches every row."""
    if not expression.strip():
        return lambda row: True
    return _Parser(expression).parse()


def matches(predicate: Predicate, row: Row) -> bool:
    return predicate(row) is True


def _tokens(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if match is None:
            raise _error(expression, f"unexpected character {expression[position]!r}", position)
        kind, text = match.lastgroup or "", match.group()
        if kind == "string":
            tokens.append(_Token(kind, text, _unquote(expression, text, position), position))
        elif kind == "number":
            value = float(text) if any(c in text for c in ".eE") else int(text)
            tokens.append(_Token(kind, text, value, position))
        elif kind == "name" and text.lower() in _KEYWORDS:
            tokens.append(_Token("keyword", text, text.lower(), position))
        elif kind != "space":
            tokens.append(_Token(kind, text, text, position))
        position = match.end()
    tokens.append(_Token("end", "", None, len(expression)))
    return tokens


def _unquote(expression: str, literal: str, column: int) -> str:
    out: list[str] = []
    body = iter(enumerate(literal[1:-1], start=column + 1))
    for index, char in body:
        if char != "\\":
            out.append(char)
            continue
        _, escaped = next(body)
        if escaped not in _ESCAPES:
            raise _error(expression, f"unknown escape sequence \\{escaped}", index)
        out.append(_ESCAPES[escaped])
    return "".join(out)


def _error(expression: str, reason: str, column: int) -> InvalidFilter:
    return InvalidFilter(
        f"invalid filter {expression!r}: {reason} at column {column + 1} ({_HINT})"
    )


class _Parser:
    """Recursive descent: or > and > not > comparison, loosest first."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens = _tokens(expression)
        self.index = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def _take(self) -> _Token:
        token = self.token
        self.index += 1
        return token

    def _at(self, *values: str) -> bool:
        return self.token.kind in ("keyword", "op") and self.token.value in values

    def _fail(self, reason: str, token: _Token | None = None) -> InvalidFilter:
        return _error(self.expression, reason, (token or self.token).column)

    def _expect(self, value: str) -> None:
        if not self._at(value):
            raise self._fail(f"expected {value!r}, got {self.token.text or 'the end'!r}")
        self._take()

    def parse(self) -> Predicate:
        predicate = self._or()
        if self.token.kind != "end":
            raise self._fail(f"unexpected {self.token.text!r}")
        return predicate

    def _or(self) -> Predicate:
        parts = [self._and()]
        while self._at("or", "||"):
            self._take()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else _any_of(parts)

    def _and(self) -> Predicate:
        parts = [self._not()]
        while self._at("and", "&&"):
            self._take()
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else _all_of(parts)

    def _not(self) -> Predicate:
        if self._at("not", "!"):
            self._take()
            inner = self._not()
            return lambda row: None if (value := inner(row)) is None else not value
        return self._primary()

    def _primary(self) -> Predicate:
        token = self.token
        if self._at("("):
            self._take()
            inner = self._or()
            self._expect(")")
            return inner
        if self._at("true", "false"):
            self._take()
            constant = token.value == "true"
            return lambda row: constant
        if token.kind == "end":
            raise self._fail("unexpected end of expression")
        if token.kind != "name":
            raise self._fail(f"expected a field, got {token.text!r}")
        return self._comparison()

    def _comparison(self) -> Predicate:
        start = self.token
        get, is_json = self._field()
        if self._at(*_COMPARISONS):
            symbol = self._take().value
            literal = self._literal()
            if is_json:
                return _json_comparison(get, symbol, literal)
            if not isinstance(literal, str):
                raise self._fail(f"{start.text} is a string: compare it with a string", start)
            compare = _COMPARISONS[symbol]
            return lambda row: compare(get(row), literal)
        negated = self._at("not")
        if negated:
            self._take()
            if not self._at("in"):
                raise self._fail("expected 'in' after 'not'")
        if self._at("in"):
            if is_json:
                raise self._fail("'in' works on id, uri and caption only", start)
            self._take()
            values = frozenset(self._string_list())
            if negated:
                return lambda row: get(row) not in values
            return lambda row: get(row) in values
        if self._at("like"):
            self._take()
            pattern = self._literal()
            if not isinstance(pattern, str):
                raise self._fail("like needs a string pattern")
            regex = _like_regex(pattern)
            if is_json:
                return lambda row: _json_like(get(row), regex)
            return lambda row: regex.fullmatch(get(row)) is not None
        raise self._fail(f"expected a comparison after {start.text}, got {self.token.text!r}")

    def _field(self) -> tuple[Callable[[Row], Any], bool]:
        token = self._take()
        name = token.text
        if name in STRING_FIELDS:
            return (lambda row: row[name]), False
        if name != JSON_FIELD:
            if self._at("("):
                raise self._fail(f"function {name}() is not supported", token)
            raise self._fail(f"unknown field {name!r}", token)
        path: list[str | int] = []
        while self._at("["):
            self._take()
            key = self._take()
            if key.kind not in ("string", "number") or isinstance(key.value, float):
                raise self._fail("a metadata key is a string or an integer index", key)
            path.append(key.value)
            self._expect("]")
        if not path:
            raise self._fail('compare a metadata key (metadata["key"]), not all of it', token)
        return (lambda row: _lookup(row[JSON_FIELD], path)), True

    def _literal(self) -> str | int | float | bool:
        token = self._take()
        if token.kind in ("string", "number"):
            value: str | int | float = token.value
            return value
        if token.kind == "keyword" and token.value in ("true", "false"):
            return bool(token.value == "true")
        raise self._fail(f"expected a value, got {token.text or 'the end'!r}", token)

    def _string_list(self) -> list[str]:
        self._expect("[")
        values: list[str] = []
        while not self._at("]"):
            token = self._take()
            if token.kind != "string":
                raise self._fail("'in' takes a list of strings", token)
            values.append(token.value)
            if not self._at("]"):
                self._expect(",")
        self._take()
        return values


def _all_of(parts: list[Predicate]) -> Predicate:
    def all_of(row: Row) -> bool | None:
        values = [part(row) for part in parts]
        if False in values:
            return False
        return None if None in values else True

    return all_of


def _any_of(parts: list[Predicate]) -> Predicate:
    def any_of(row: Row) -> bool | None:
        values = [part(row) for part in parts]
        if True in values:
            return True
        return None if None in values else False

    return any_of


def _lookup(value: Any, path: list[str | int]) -> Any:
    """The JSON value at `path`, or None where the path does not exist."""
    for key in path:
        if isinstance(key, str) and isinstance(value, dict):
            value = value.get(key)
        elif isinstance(key, int) and isinstance(value, list) and 0 <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool | int | float):
        return "number"
    return "string" if isinstance(value, str) else "other"


def _json_comparison(
    get: Callable[[Row], Any], symbol: str, literal: str | int | float | bool
) -> Predicate:
    compare, kind = _COMPARISONS[symbol], _kind(literal)

    def evaluate(row: Row) -> bool | None:
        value = get(row)
        if value is None:
            return None
        if _kind(value) != kind:
            return symbol == "!="
        return bool(compare(value, literal))

    return evaluate


def _json_like(value: Any, regex: re.Pattern[str]) -> bool | None:
    if value is None:
        return None
    return isinstance(value, str) and regex.fullmatch(value) is not None


def _like_regex(pattern: str) -> re.Pattern[str]:
    parts = [".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)
