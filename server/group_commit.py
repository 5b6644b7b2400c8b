"""Group commits: the writes of many callers, one store call per batch.

`GroupCommit` batches items with the same core as inference (`batcher.MicroBatcher`): a
batch closes at `max_batch_size` items or `max_wait_ms` after its first, and a lone write
after a quiet spell goes at once. `commit(items)` writes one batch (an upsert). If it
refuses a batch with an error that one row can cause (`splittable`), the rows are committed
apart, so only the bad one fails and no item sees an error about another's data; an error
of the store itself (unavailable, collection gone) fails the whole batch. Up to `workers`
batches are committed at once (a Milvus server takes concurrent writes; each item is still
acknowledged only after its own batch's commit returned).

Each item learns its own outcome and where its time went: waiting for its batch, and in
the store (the batch's commit, plus its own retry when the batch was split).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from clipsearch.server.batcher import MicroBatcher, unexpected_error
from clipsearch.server.errors import ClipsearchError, ErrorCode

log = logging.getLogger(__name__)

P = TypeVar("P")

# Errors a single row can cause; any other (UNAVAILABLE, NOT_FOUND, ...) is the store's.
ROW_ERROR_CODES = frozenset({ErrorCode.INVALID_ARGUMENT, ErrorCode.INTERNAL})


def row_error(exc: BaseException) -> bool:
    """Could one row of the batch have caused `exc`? Then committing the rows apart helps."""
    if isinstance(exc, ClipsearchError):
        return exc.code in ROW_ERROR_CODES
    return isinstance(exc, Exception)


@dataclass(frozen=True)
class CommitTiming:
    queue_us: int  # waiting for the batch to close and for the previous commit
    store_us: int  # the batch's commit, and this item's own when the batch was split
    batch_size: int


@dataclass(frozen=True)
class _Outcome:
    error: ClipsearchError | None
    store_us: int


class GroupCommit(Generic[P]):
    def __init__(
        self,
        name: str,
        commit: Callable[[list[P]], Awaitable[object]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        workers: int = 1,
        splittable: Callable[[BaseException], bool] = row_error,
    ) -> None:
        self.name = name
        self._commit = commit
        self._splittable = splittable
        self._batcher = _CommitBatcher(
            name,
            self._run,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            workers=workers,
        )

    async def start(self) -> None:
        await self._batcher.start()

    async def close(self) -> None:
        """Let the commit in progress finish; items still queued fail with Unavailable."""
        await self._batcher.close()

    async def write(self, item: P) -> CommitTiming:
        """Commit `item` with the next batch; raises its error if it was not written."""
        (result,) = await self._batcher.submit([item])
        if result.value.error is not None:
            raise result.value.error
        return CommitTiming(result.timing.queue_us, result.value.store_us, result.timing.batch_size)

    async def write_each(self, items: Sequence[P]) -> list[CommitTiming | ClipsearchError]:
        """Commit `items` with the next batches: each one's timing, or its own error if it
        was not written (one item's error does not touch the others)."""
        results = await self._batcher.submit_each(items)
        outcomes: list[CommitTiming | ClipsearchError] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, ClipsearchError):
                    raise result  # the batcher turns every batch error into a domain error
                outcomes.append(result)
            elif result.value.error is not None:
                outcomes.append(result.value.error)
            else:
                outcomes.append(
                    CommitTiming(
                        result.timing.queue_us, result.value.store_us, result.timing.batch_size
                    )
                )
        return outcomes

    async def _run(self, items: list[P]) -> list[_Outcome]:
        started = time.perf_counter()
        try:
            await self._commit(items)
        except Exception as exc:
            if len(items) == 1 or not self._splittable(exc):
                raise
            batch_us = _since(started)
            log.info(
                "%s: the store refused a batch of %d (%s); committing its rows apart",
                self.name,
                len(items),
                _describe(exc),
            )
            return [await self._apart(item, batch_us) for item in items]
        return [_Outcome(None, _since(started))] * len(items)

    async def _apart(self, item: P, batch_us: int) -> _Outcome:
        started = time.perf_counter()
        try:
            await self._commit([item])
        except Exception as exc:
            error = exc if isinstance(exc, ClipsearchError) else unexpected_error(self.name, exc)
            return _Outcome(error, batch_us + _since(started))
        return _Outcome(None, batch_us + _since(started))


class _CommitBatcher(MicroBatcher[P, _Outcome]):
    def __init__(
        self,
        name: str,
        run: Callable[[list[P]], Awaitable[Sequence[_Outcome]]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        workers: int,
    ) -> None:
        super().__init__(
            name,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            workers=workers,
        )
        self._run_commit = run

    async def _execute(self, payloads: list[P]) -> Sequence[_Outcome]:
        return await self._run_commit(payloads)


def _describe(exc: BaseException) -> str:
    return f"{exc.code.name}" if isinstance(exc, ClipsearchError) else type(exc).__name__


def _since(started: float) -> int:
    return int((time.perf_counter() - started) * 1e6)
