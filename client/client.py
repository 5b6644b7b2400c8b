"""The blocking client.

    from clipsearch.client import Client

    with Client("127.0.0.1:50051") as client:
        client.ingest_path("gallery/manifest.csv", caption_field="caption_en")
        for hit in client.search("a red circle", top_k=5).hits:
            print(hit.score, hit.id, hit.caption)

Every call has a deadline (the client's `timeout`, or the call's own `timeout=`), idempotent
calls are retried by gRPC on UNAVAILABLE / RESOURCE_EXHAUSTED with backoff (see
`clipsearch.client.channel`), and every failure is a typed `ClipsearchError`.

The operations are written once, in `clipsearch.client.operations`; this face performs
their steps blocking (see `clipsearch.client.base`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

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
from clipsearch.client.ingest import Backoff, IngestState, SyncIngestStream
from clipsearch.client.types import EncodeResult, IngestItem
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1.clipsearch_pb2_grpc import ClipSearchStub

P = ParamSpec("P")
T = TypeVar("T")


def blocking(
    op: Callable[Concatenate[ClientBase, P], Plan[T]],
) -> Callable[Concatenate[Client, P], T]:
    """An operation as a blocking method."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(op(self, *args, **kwargs))

    return as_method(method, op, "Client")


class Client(ClientBase):
    """A blocking clipsearch client; use it as a context manager or call `close()`.

    Args:
        address: "host:port" of the server.
        timeout: default deadline of every unary call, seconds (per-call `timeout=` wins).
        token: sent as `authorization: Bearer TOKEN` with every call.
        tls: TLS (or mutual TLS) settings; None = plaintext.
        max_message_mb: largest message sent or received.
        retry: let gRPC retry idempotent calls on UNAVAILABLE / RESOURCE_EXHAUSTED.
        options: extra gRPC channel options; they override the client's own.
    """

    _channel: grpc.Channel
    _stub: ClipSearchStub

    def _connect(self) -> None:
        self._channel = self.channel_config.sync_channel()
        self._stub = ClipSearchStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, plan: Plan[T]) -> T:
        stepper = Stepper(plan)
        try:
            step = stepper.advance()
            while step is not None:
                try:
                    outcome = self._perform(step)
                except Exception as exc:
                    step = stepper.advance(error=exc)
                else:
                    step = stepper.advance(outcome)
        finally:
            stepper.close()
        return stepper.result

    def _perform(self, step: Step) -> Any:
        if isinstance(step, Call):
            method = step.method(self._stub)
            return method(step.request, timeout=step.deadline, metadata=self._metadata)
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, Blocking):
            return step.work()
        return self._ingest_stream(step.state, step.items, step.timeout).run()

    # --- the unary operations --------------------------------------------------------------

    info = blocking(operations.info)
    wait_until_ready = blocking(operations.wait_until_ready)
    encode_texts = blocking(operations.encode_texts)
    encode_images = blocking(operations.encode_images)
    search = blocking(operations.search)
    compare = blocking(operations.compare)
    ingest_path = blocking(operations.ingest_path)
    get = blocking(operations.get)
    delete = blocking(operations.delete)
    count = blocking(operations.count)
    create_collection = blocking(operations.create_collection)
    list_collections = blocking(operations.list_collections)
    drop_collection = blocking(operations.drop_collection)
    profile = blocking(operations.profile)

    # --- the streams -----------------------------------------------------------------------

    def encode_stream(
        self,
        batches: Iterable[Sequence[str | bytes]],
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[EncodeResult]:
        """Many encode requests over one stream; results in request order.

        Each batch is a list of texts (`str`) and images (`bytes`). A batch that fails (e.g.
        a corrupt image) yields a result with `.error` set and the stream goes on. `model`
        names a served model (default: the server's default). `timeout` bounds the whole
        stream (default: no deadline).
        """
        requests = operations.EncodeRequests(batches, model)
        call = self._stub.EncodeStream(iter(requests), timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield convert.encode_result(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
        requests.check()

    def ingest(
        self,
        items: Iterable[IngestItem],
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
    ) -> SyncIngestStream:
        """Stream items into a collection; yields one `IngestResult` per item as the server
        finishes it (completion order; `seq` counts items from 0 in source order).

        At most `window` items are in flight. If the stream breaks (UNAVAILABLE), the client
        reconnects with exponential backoff and resends the unacknowledged items; the server
        upserts by id, so nothing is duplicated (a draining or restarting server ends the
        stream UNAVAILABLE, a restarted one takes it up). It gives up once it has waited
        `backoff.give_up_s` (default 120 s) without an acknowledgement, or after
        `max_attempts` attempts in a row without one if that is set. `model`: the served
        model of a collection created here (default: the server's default); an existing one
        must be its model's. Items may carry vectors computed elsewhere (`IngestItem.
        image_vector`, `caption_vector`): they are stored without encoding, and
        `vectors_model_id` names the model that computed them (`ServerInfo.model_id` of a
        server serving it); a collection of another model refuses the stream
        (FailedPrecondition), an item whose vector is of the wrong dimension, not finite or
        zero fails alone (INVALID_ARGUMENT). `progress` shows a tqdm bar (of `total` items,
        or `len(items)` when it has one). `timeout` bounds each stream (default: none).
        Iterate the returned stream, or call its `run()` for the `IngestSummary`.
        """
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
        self, state: IngestState, items: Iterable[IngestItem], timeout: float | None
    ) -> SyncIngestStream:
        def open_stream(requests: Iterator[pb.IngestRequest]) -> Iterable[pb.IngestResponse]:
            return self._stub.Ingest(requests, timeout=timeout, metadata=self._metadata)

        return SyncIngestStream(state, items, open_stream)
