"""pymilvus exceptions -> domain errors. No pymilvus exception leaves the store.

Codes seen here (pymilvus 3.0.2): 2 = cannot connect (both backends); 100 = collection
not found (both); 101 = collection not loaded; Milvus Lite 6 = bad parameter, which for a
filter is a parse or type error with a readable caret message; Milvus 2.3 puts filter
errors under 65535 with "cannot parse expression".
"""

from __future__ import annotations

import errno
import re

import grpc
from pymilvus.exceptions import (
    ConnectionConfigException,
    ConnectionNotExistException,
    MilvusException,
    ParamError,
)

from clipsearch.server.errors import (
    ClipsearchError,
    InvalidFilter,
    InvalidInput,
    NotFound,
    StorageFull,
    Unavailable,
)

CODE_CANNOT_CONNECT = 2
CODE_COLLECTION_NOT_FOUND = 100
CODE_COLLECTION_NOT_LOADED = 101
CODE_LITE_ILLEGAL_ARGUMENT = 6
_UNAVAILABLE_GRPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_FILTER_HINTS = ("cannot parse expression", "failed to create query plan")
_LITE_FILTER_HINT = " at column "
_TIMEOUT_HINTS = (
    "timeout",
    "deadline exceeded",
    "retry run out",
    "connection reset",
    "connection refused",
    "connection aborted",
    "broken pipe",
    "socket closed",
    "server unavailable",
    "failed to connect",
    "fail connecting",
)
_DISK_FULL_HINTS = ("no space left on device", "[errno 28]", "enospc", "disk quota exceeded")
_PLAN_PREFIX = re.compile(r"^failed to create query plan: (cannot parse expression: )?")


def message_of(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    return str(message if message else exc)


def is_not_loaded(exc: BaseException) -> bool:
    return isinstance(exc, MilvusException) and (
        exc.code == CODE_COLLECTION_NOT_LOADED or "not loaded" in message_of(exc).lower()
    )


def is_collection_not_found(exc: BaseException) -> bool:
    if not isinstance(exc, MilvusException):
        return False
    text = message_of(exc).lower()
    return exc.code == CODE_COLLECTION_NOT_FOUND or (
        "collection" in text and ("not exist" in text or "not found" in text)
    )


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionNotExistException, ConnectionConfigException)):
        return True
    if isinstance(exc, grpc.RpcError):
        return exc.code() in _UNAVAILABLE_GRPC
    if isinstance(exc, MilvusException):
        text = message_of(exc).lower()
        return exc.code == CODE_CANNOT_CONNECT or any(h in text for h in _TIMEOUT_HINTS)
    return isinstance(exc, (ConnectionError, TimeoutError))


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = message_of(exc).lower()
    return any(h in text for h in _DISK_FULL_HINTS)


def is_filter_error(exc: BaseException) -> bool:
    if not isinstance(exc, MilvusException):
        return False
    text = message_of(exc).lower()
    lite_parse_error = exc.code == CODE_LITE_ILLEGAL_ARGUMENT and _LITE_FILTER_HINT in text
    return lite_parse_error or any(h in text for h in _FILTER_HINTS)


def translate(exc: BaseException, collection: str = "", filter: str = "") -> ClipsearchError:
    """The domain error for a failed Milvus call on `collection` with `filter`."""
    if isinstance(exc, ClipsearchError):
        return exc
    if is_disk_full(exc):
        return StorageFull(
            "vector store disk full (no space left on device): nothing of this write is "
            "acknowledged; free disk space, then resume"
        )
    if is_unavailable(exc):
        return Unavailable(f"vector store unavailable: {message_of(exc)}")
    if collection and is_collection_not_found(exc):
        return NotFound(f"collection {collection!r} does not exist")
    if filter and is_filter_error(exc):
        explanation = _PLAN_PREFIX.sub("", message_of(exc))
        return InvalidFilter(f"invalid filter {filter!r}: {explanation}")
    if isinstance(exc, ParamError):
        return InvalidInput(f"vector store refused the request: {message_of(exc)}")
    return ClipsearchError(f"vector store error: {message_of(exc)}")
