"""The one translation from domain errors to gRPC statuses, and the catch-all around it.

Every RPC handler runs inside `ErrorInterceptor`: a `ClipsearchError` becomes its status code
with its message (and one log line); anything else is logged with its traceback under a
short reference and the client gets INTERNAL with that reference — never the traceback. No
request can kill the server. A request message protobuf cannot decode (invalid UTF-8 in a
string field, a corrupt wire format) is INVALID_ARGUMENT: grpc decodes it before any
handler runs and would answer UNKNOWN, so the interceptor's deserializer hands the handler
a marker instead, which the handler turns into the error. `AuthInterceptor` checks a bearer
token when one is configured. `TelemetryInterceptor`,
the outermost when metrics or traces are on, tells an observer of each call's start, its
responses and its final status code.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc import aio

from clipsearch.server.errors import ClipsearchError, ErrorCode, InvalidInput

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc's classes are generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = aio.ServerInterceptor[Any, Any]
else:
    Interceptor = aio.ServerInterceptor
# grpc passes None for methods no service implements.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]

STATUS_OF: dict[ErrorCode, grpc.StatusCode] = {
    code: grpc.StatusCode[code.name] for code in ErrorCode
}

# Probes and tooling must work without credentials.
UNAUTHENTICATED_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


# A refused request is logged on one line; its message (which may quote the request) is cut.
MAX_LOGGED_MESSAGE = 300


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    if isinstance(exc, ClipsearchError):
        return STATUS_OF[exc.code], str(exc) or type(exc).__name__
    reference = uuid.uuid4().hex[:12]
    log.error("unexpected error (ref %s)", reference, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {reference}); the server log has details"


async def _abort(context: aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    code, message = status_of(exc)
    if isinstance(exc, ClipsearchError):
        shown = message[:MAX_LOGGED_MESSAGE] + ("..." if len(message) > MAX_LOGGED_MESSAGE else "")
        log.info("%s -> %s: %s", method, code.name, shown.replace("\n", " "))
    await context.abort(code, message)


@dataclass(frozen=True)
class _Undecodable:
    """What the handler gets in place of a request message protobuf could not decode."""

    reason: str


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a decoder raises
            return _Undecodable(f"the request message could not be decoded: {exc}")

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidInput(request.reason)
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _requests(request: Any, streaming: bool) -> Any:
    return _decoded_stream(request) if streaming else _decoded(request)


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str, streaming: bool
) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(_requests(request, streaming), context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)
            return None

    return handler


def _wrap_streaming(
    behavior: Callable[..., Any], method: str, streaming: bool
) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            responses = behavior(_requests(request, streaming), context)
            if inspect.isawaitable(responses):  # a handler that writes with context.write()
                await responses
                return
            async for response in responses:
                yield response
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return handler


def _rewrap(handler: Handler, wrap: Callable[[Any], Any], lenient: bool = False) -> Handler:
    deserializer = handler.request_deserializer
    common = {
        "request_deserializer": _lenient(deserializer) if lenient else deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **common)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **common)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **common)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **common)


class ErrorInterceptor(Interceptor):
    async def intercept_service(  # type: ignore[override]  # None: see Continuation
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method, streaming = handler_call_details.method, handler.request_streaming
        if handler.response_streaming:
            return _rewrap(handler, lambda b: _wrap_streaming(b, method, streaming), lenient=True)
        return _rewrap(handler, lambda b: _wrap_unary(b, method, streaming), lenient=True)


class AuthInterceptor(Interceptor):
    """Requires `authorization: Bearer <token>` on every call but health and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(  # type: ignore[override]  # None: see Continuation
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        if method.startswith(UNAUTHENTICATED_METHODS):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _rewrap(handler, lambda _: _deny)


async def _deny(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
    # A coroutine serves streaming methods too: it ends the call before any response.
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


# --- telemetry ---------------------------------------------------------------------------


class CallObserver(Protocol):
    def message(self, response: Any) -> None: ...

    def finish(self, code: grpc.StatusCode) -> None: ...


class ObserveCall(Protocol):
    """Called as a handler starts: (method, metadata, `perf_counter()` when the call reached
    the interceptors) → the call's observer."""

    def __call__(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], accepted: float
    ) -> CallObserver: ...


def _final_code(context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code: object = context.code()  # an int or None at run time, whatever the stubs say
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def _observed_unary(
    behavior: Callable[..., Awaitable[Any]], start: Callable[[], CallObserver]
) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        call = start()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await behavior(request, context)
            if response is not None:
                call.message(response)
            code = _final_code(context)
            return response
        except aio.AbortError:
            code = _final_code(context)
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            call.finish(code)

    return handler


def _observed_streaming(
    behavior: Callable[..., Any], start: Callable[[], CallObserver]
) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = start()
        code = grpc.StatusCode.UNKNOWN
        try:
            responses = behavior(request, context)
            if inspect.isawaitable(responses):
                await responses
            else:
                async for response in responses:
                    call.message(response)
                    yield response
            code = _final_code(context)
        except aio.AbortError:
            code = _final_code(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            call.finish(code)

    return handler


class TelemetryInterceptor(Interceptor):
    """Reports every call to `observe`: its start (and how long after it reached the server),
    each response, and the status it ended with, whichever interceptor or handler set it."""

    def __init__(self, observe: ObserveCall) -> None:
        self._observe = observe

    async def intercept_service(  # type: ignore[override]  # None: see Continuation
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        accepted = time.perf_counter()
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())

        def start() -> CallObserver:
            return self._observe(method, metadata, accepted)

        if handler.response_streaming:
            return _rewrap(handler, lambda b: _observed_streaming(b, start))
        return _rewrap(handler, lambda b: _observed_unary(b, start))
