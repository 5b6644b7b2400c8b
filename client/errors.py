"""Typed errors of the client: one exception class per gRPC status code.

Every `Client` / `AsyncClient` method raises a `ClipsearchError` subclass, never a raw
`grpc.RpcError`: `except clipsearch.client.NotFound` reads better than comparing status codes,
and `.code` / `.message` are still there for generic handling. Per-item errors that travel in
messages (EncodeStream responses, Ingest acks) carry the same codes as integers; `error_for`
turns both forms into the same classes.
"""

from __future__ import annotations

import grpc


class ClipsearchError(Exception):
    """Base of all client errors. `code` is the gRPC status, `message` what was wrong."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code or self.default_code

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. "NOT_FOUND"."""
        return self.code.name

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later (the server or a dependency was busy)."""
        return self.code in RETRYABLE_CODES

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Cancelled(ClipsearchError):
    default_code = grpc.StatusCode.CANCELLED


class Unknown(ClipsearchError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ClipsearchError):
    """Bad input: an empty query, a corrupt image, a bad filter, a wrong vector size."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(ClipsearchError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ClipsearchError):
    """An unknown collection or item id."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ClipsearchError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ClipsearchError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ClipsearchError):
    """The server's queue is full (retry later), or a message is over the size limit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ClipsearchError):
    """E.g. a collection built with another model than the one being served."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ClipsearchError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRange(ClipsearchError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ClipsearchError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ClipsearchError):
    default_code = grpc.StatusCode.INTERNAL


class Unavailable(ClipsearchError):
    """The server is unreachable, starting, draining, or its store is down: safe to retry."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ClipsearchError):
    default_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ClipsearchError):
    """No token, or a wrong one, for a server that requires `authorization: Bearer`."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

ERROR_CLASSES: dict[grpc.StatusCode, type[ClipsearchError]] = {
    cls.default_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}

_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int | grpc.StatusCode) -> grpc.StatusCode:
    """A status code from its wire integer (as in `error_code` fields); unknown -> UNKNOWN."""
    if isinstance(value, grpc.StatusCode):
        return value
    return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def error_for(code: int | grpc.StatusCode, message: str) -> ClipsearchError:
    """The typed error for a status code (an integer from a message, or a StatusCode)."""
    status = status_code(code)
    cls = ERROR_CLASSES.get(status, ClipsearchError)
    return cls(message or status.name.lower().replace("_", " "), status)


def from_rpc_error(error: grpc.RpcError) -> ClipsearchError:
    """The typed error for a failed call (`grpc.RpcError` from the sync or asyncio API)."""
    # Sync errors are grpc.Call objects, asyncio ones (AioRpcError) are not: both have
    # code() and details().
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, details if isinstance(details, str) else str(error))
