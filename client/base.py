"""What `Client` and `AsyncClient` share: configuration, and the plans that both faces run.

Every operation is written once, in `clipsearch.client.operations`, as a *plan*: a generator
that builds the request, yields the `Step`s that need waiting (a unary call, a pause, a file
read, a whole ingest), receives each step's outcome, and returns the operation's value. It
does no I/O of its own. `Client` performs each step blocking, `AsyncClient` awaits it; that
is all the faces add, besides the two streaming calls.

    def count(client, filter="", *, collection=None, timeout=None) -> Plan[int]:
        return (yield from unary(client, convert.count_rpc(filter, collection), timeout))

`unary` is where every unary call gets its deadline and its error mapping, and where its
response is converted. A failed step is thrown back into the plan, so a plan handles errors
with plain `try`/`except` (see `wait_until_ready`).

Every call's metadata (`ClientBase._metadata`) carries the caller's OpenTelemetry trace
context (W3C `traceparent`) when a span is active, so the server's span joins the caller's
trace. OpenTelemetry is not a dependency of the client: an application that traces has
imported it already, and one that has not cannot have an active span.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Generator, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, cast

import grpc

from clipsearch.client import convert
from clipsearch.client.channel import ChannelConfig, TlsConfig, call_metadata
from clipsearch.client.errors import from_rpc_error
from clipsearch.client.ingest import Backoff, IngestState, progress_bar
from clipsearch.client.types import IngestItem
from clipsearch.defaults import DEFAULT_ADDRESS

if TYPE_CHECKING:
    from clipsearch.v1.clipsearch_pb2_grpc import ClipSearchStub

DEFAULT_TIMEOUT_S = 30.0

T = TypeVar("T")
MethodT = TypeVar("MethodT", bound=Callable[..., Any])


class ClientBase:
    """Configuration common to both clients (see `Client` for the arguments)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        tls: TlsConfig | None = None,
        max_message_mb: int = 64,
        retry: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.address = address
        self.timeout = timeout
        self.channel_config = ChannelConfig(
            address=address,
            tls=tls,
            max_message_mb=max_message_mb,
            retry=retry,
            extra_options=tuple(options),
        )
        self._static_metadata = call_metadata(token)
        self._connect()

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of a call starting now: the token, and the current trace context."""
        return self._static_metadata + trace_context()

    def _connect(self) -> None:
        """Open the face's channel and stub."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

    def _deadline(self, timeout: float | None) -> float:
        """The per-call timeout: the call's own, else the client's default."""
        return self.timeout if timeout is None else timeout


def trace_context() -> tuple[tuple[str, str], ...]:
    """The active OpenTelemetry span's context as gRPC metadata (`traceparent`, and
    `tracestate`/`baggage` where set), through the globally configured propagator; empty
    when OpenTelemetry was never imported or no span is active."""
    if "opentelemetry.trace" not in sys.modules:
        return ()
    from opentelemetry import propagate, trace  # noqa: PLC0415  # loaded already

    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


# --- steps: what a plan waits for --------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A unary call; its outcome is the response message."""

    method: Callable[[ClipSearchStub], grpc.UnaryUnaryMultiCallable[Any, Any]]
    request: Any
    deadline: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Blocking:
    """Work that may block (reading files): run off the event loop by the async face."""

    work: Callable[[], Any]


@dataclass(frozen=True)
class Drain:
    """A whole ingest stream, run to its end; its outcome is the `IngestSummary`."""

    state: IngestState
    items: Iterable[IngestItem]
    timeout: float | None


Step: TypeAlias = Call | Sleep | Blocking | Drain
Plan: TypeAlias = Generator[Step, Any, T]


def unary(client: ClientBase, rpc: convert.Rpc[Any, Any, T], timeout: float | None) -> Plan[T]:
    """One unary call: deadline, typed errors, and the response converted."""
    try:
        response = yield Call(rpc.method, rpc.request, client._deadline(timeout))
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    return rpc.parse(response)


def blocking(work: Callable[[], T]) -> Plan[T]:
    return cast(T, (yield Blocking(work)))


# --- driving a plan ----------------------------------------------------------------------


class Stepper(Generic[T]):
    """Feeds a plan the outcome of each step; `advance` returns its next step, or None
    when it has returned (its value is then `result`)."""

    def __init__(self, plan: Plan[T]) -> None:
        self._plan = plan
        self._result: Any = None

    @property
    def result(self) -> T:
        return cast(T, self._result)

    def advance(self, outcome: Any = None, error: Exception | None = None) -> Step | None:
        try:
            if error is not None:
                return self._plan.throw(error)
            return self._plan.send(outcome)
        except StopIteration as stop:
            self._result = stop.value
            return None

    def close(self) -> None:
        self._plan.close()


def as_method(method: MethodT, op: Callable[..., Any], owner: str) -> MethodT:
    """Dress a face's wrapper of an operation as `owner`'s method: the operation's name and
    docstring, and its signature with `self` first, returning what the plan returns (for
    help() and inspect; mypy reads the types of the wrapper itself)."""
    functools.update_wrapper(method, op)
    method.__qualname__ = f"{owner}.{op.__name__}"
    signature = inspect.signature(op)
    first, *rest = signature.parameters.values()
    returns = signature.return_annotation
    if isinstance(returns, str) and returns.startswith("Plan[") and returns.endswith("]"):
        returns = returns[len("Plan[") : -1]
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[first.replace(name="self", annotation=inspect.Parameter.empty), *rest],
        return_annotation=returns,
    )
    return method


# --- ingest ------------------------------------------------------------------------------


def ingest_state(
    items: object,
    *,
    collection: str | None,
    create_collection: bool,
    skip_existing: bool,
    model: str | None = None,
    vectors_model_id: str | None = None,
    progress: bool,
    total: int | None,
    window: int,
    max_attempts: int | None,
    backoff: Backoff | None,
) -> IngestState:
    """The state of one ingest run (`total` defaults to `len(items)` where it has one)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    return IngestState(
        convert.ingest_options(
            collection, create_collection, skip_existing, model, vectors_model_id
        ),
        window=window,
        max_attempts=max_attempts,
        backoff=backoff or Backoff(),
        progress=progress_bar(total) if progress else None,
    )
