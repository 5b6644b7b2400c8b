# The per-call `timeout` of these coroutines is the gRPC deadline sent to the server, not an
# asyncio timeout around them, and it mirrors the sync client's API.
# ruff: noqa: ASYNC109
"""The asyncio client: `Client`'s API with `async` methods and async iterators.

    from clipsearch.client import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.search("a red circle")
        async for ack in client.ingest(items):
            ...

Same channel (options, retries, TLS, token), the same operations (`clipsearch.client.
operations`) and the same ingest state machine as the sync client; only the waiting
differs: this face awaits each step of a plan, and reads files off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import grpc
from grpc import aio

from clipsearch.client import convert, operations
from clipsearch.client.base import (
    Blocking,
    Call,
    ClientBase,
    Plan,
    Sleep,
    Step,
    Stepper,
    as_method,
    ingest_state,
)
from clipsearch.client.errors import from_rpc_error
from clipsearch.client.ingest import AsyncIngestStream, Backoff, IngestState
from clipsearch.client.types import EncodeResult, IngestItem
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1.clipsearch_pb2_grpc import ClipSearchStub

if TYPE_CHECKING:  # typing only: mypy-protobuf's stub of ClipSearchStub on an aio channel
    from clipsearch.v1.clipsearch_pb2_grpc import ClipSearchAsyncStub

P = ParamSpec("P")
T = TypeVar("T")


def awaitable(
    op: Callable[Concatenate[ClientBase, P], Plan[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """An operation as a coroutine method."""

    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(op(self, *args, **kwargs))

    return as_method(method, op, "AsyncClient")


class AsyncClient(ClientBase):
    """An asyncio clipsearch client (arguments as `Client`); `async with` or `await close()`.

    Create it inside the event loop that uses it.
    """

    _channel: aio.Channel
    _stub: ClipSearchAsyncStub

    def _connect(self) -> None:
        self._channel = self.channel_config.aio_channel()
        self._stub = ClipSearchStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, plan: Plan[T]) -> T:
        stepper = Stepper(plan)
        try:
            step = stepper.advance()
            while step is not None:
                try:
                    outcome = await self._perform(step)
                except Exception as exc:
                    step = stepper.advance(error=exc)
                else:
                    step = stepper.advance(outcome)
        finally:
            stepper.close()
        return stepper.result

    async def _perform(self, step: Step) -> Any:
        if isinstance(step, Call):
            # The stub's methods are typed once, on the sync stub; on an aio channel they
            # are the aio multi-callables (ClipSearchAsyncStub's types), whose calls await.
            method = cast("aio.UnaryUnaryMultiCallable[Any, Any]", step.method(self._stub))
            return await method(step.request, timeout=step.deadline, metadata=self._metadata)
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, Blocking):
            return await asyncio.to_thread(step.work)
        return await self._ingest_stream(step.state, step.items, step.timeout).run()

    # --- the unary operations --------------------------------------------------------------

    info = awaitable(operations.info)
    wait_until_ready = awaitable(operations.wait_until_ready)
    encode_texts = awaitable(operations.encode_texts)
    encode_images = awaitable(operations.encode_images)
    search = awaitable(operations.search)
    compare = awaitable(operations.compare)
    ingest_path = awaitable(operations.ingest_path)
    get = awaitable(operations.get)
    delete = awaitable(operations.delete)
    count = awaitable(operations.count)
    create_collection = awaitable(operations.create_collection)
    list_collections = awaitable(operations.list_collections)
    drop_collection = awaitable(operations.drop_collection)
    profile = awaitable(operations.profile)

    # --- the streams -----------------------------------------------------------------------

    async def encode_stream(
        self,
        batches: Iterable[Sequence[str | bytes]] | AsyncIterable[Sequence[str | bytes]],
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[EncodeResult]:
        """Many encode requests over one stream; results in request order (see
        `Client.encode_stream`: failed batches come back with `.error` set)."""
        requests = operations.EncodeRequests(batches, model)
        call = self._stub.EncodeStream(aiter(requests), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield convert.encode_result(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        requests.check()

    def ingest(
        self,
        items: Iterable[IngestItem] | AsyncIterable[IngestItem],
        *,
        collection: str | None = None,
        create_collection: bool = True,
        skip_existing: bool = False,
        model: str | None = None,
        vectors_model_id: str | None = None,
        progress: bool = False,
        total: int | None = None,
        window: int = 256,
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
    ) -> AsyncIngestStream:
        """Stream items into a collection (see `Client.ingest`); iterate with `async for`,
        or `await stream.run()` for the summary. `items` may be sync or async iterable."""
        state = ingest_state(
            items,
            collection=collection,
            create_collection=create_collection,
            skip_existing=skip_existing,
            model=model,
            vectors_model_id=vectors_model_id,
            progress=progress,
            total=total,
            window=window,
            max_attempts=max_attempts,
            backoff=backoff,
        )
        return self._ingest_stream(state, items, timeout)

    def _ingest_stream(
        self,
        state: IngestState,
        items: Iterable[IngestItem] | AsyncIterable[IngestItem],
        timeout: float | None,
    ) -> AsyncIngestStream:
        def open_stream(
            requests: AsyncIterator[pb.IngestRequest],
        ) -> AsyncIterable[pb.IngestResponse]:
            return self._stub.Ingest(requests, timeout=timeout, metadata=self._metadata)

        return AsyncIngestStream(state, items, open_stream)
