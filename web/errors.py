"""The one mapping of errors to HTTP: every failure the HTTP face reports has a gRPC status
code, and the status code decides the HTTP status, the way gRPC-to-HTTP gateways map them.

A body is always `{"error": {"code": "NOT_FOUND", "message": "...", "type": "..."}}`, the
shape OpenAI's API uses for errors (with the gRPC code name as its `code`), so tools that
speak that API show the message.
"""

from __future__ import annotations

import grpc

from clipsearch.client.errors import ClipsearchError, error_for

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    # A collection built with another model than the served one: the request conflicts with
    # the current state of the server, not a malformed request.
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
DEFAULT_HTTP_STATUS = 500

# OpenAI's error `type` for the statuses its clients look at; everything else is a server error.
ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, DEFAULT_HTTP_STATUS)


def invalid(message: str) -> ClipsearchError:
    """A bad request detected by the HTTP face itself (before any call to the server)."""
    return error_for(grpc.StatusCode.INVALID_ARGUMENT, message)


def error_body(error: ClipsearchError) -> tuple[int, dict[str, dict[str, str]]]:
    status = http_status(error.code)
    return status, {
        "error": {
            "code": error.code.name,
            "message": error.message,
            "type": ERROR_TYPE.get(status, "server_error"),
        }
    }
