"""The load engine of `clipsearch bench load`: one step's share of requests, from one
asyncio loop.

- closed loop: `level` workers, each sends its next request when the previous one returns;
  latency is the round trip;
- open loop: requests are due at fixed times (start + k / level) whatever the server does,
  and latency counts from the time a request was DUE, not from when it was sent. When the
  server falls behind, a request waits for one of `max_in_flight` slots and that wait is part
  of its latency (no coordinated omission); requests still unsent when the step's window
  closes are counted as dropped.

A step runs `warmup_s` unmeasured, then measures requests started (closed) or due (open) in
the next `duration_s` seconds, at most `max_requests` of them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from clipsearch.bench.load_workload import Outcome, Workload
from clipsearch.client.types import Timing
from clipsearch.defaults import DEFAULT_ADDRESS

Mode = Literal["closed", "open"]
DRAIN_MARGIN_S = 5.0


@dataclass(frozen=True)
class Step:
    mode: Mode
    level: float  # concurrency (closed loop) or requests per second (open loop)

    @property
    def label(self) -> str:
        return f"c{int(self.level)}" if self.mode == "closed" else f"{self.level:g}/s"


@dataclass(frozen=True)
class LoadConfig:
    server: str = DEFAULT_ADDRESS
    mix: tuple[tuple[str, float], ...] = (("search-text", 1.0),)
    collection: str | None = None
    top_k: int = 10
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int | None = None
    max_in_flight: int = 512
    timeout_s: float = 30.0
    token: str | None = None
    image_size: int = 224
    ingest_items: int = 1
    processes: int = 1
    seed: int = 0
    progress: bool = True
    ceiling: bool = True
    allow_remote: bool = False

    @property
    def scenario_names(self) -> list[str]:
        return [name for name, _ in self.mix]

    @property
    def scenario_label(self) -> str:
        if len(self.mix) == 1:
            return self.mix[0][0]
        return ",".join(f"{name}={weight:g}" for name, weight in self.mix)


@dataclass(frozen=True, slots=True)
class Record:
    """One measured request; times are time.perf_counter() seconds (CLOCK_MONOTONIC, the
    same clock in every process of the machine)."""

    scenario: str
    due: float  # when it should have been sent; = sent in closed loop
    sent: float
    done: float
    code: str
    timing: Timing | None


@dataclass
class StepRun:
    """The raw outcome of one step (of one process's share of it)."""

    step: Step
    records: list[Record] = field(default_factory=list)
    measure_from: float = 0.0
    scheduled: int = 0  # measured requests that were due (open loop) or started (closed)
    dropped: int = 0
    loop_cpu_s: float = 0.0
    loop_wall_s: float = 0.0

    def merge(self, other: StepRun) -> StepRun:
        return StepRun(
            self.step,
            self.records + other.records,
            min(self.measure_from, other.measure_from),
            self.scheduled + other.scheduled,
            self.dropped + other.dropped,
            max(self.loop_cpu_s, other.loop_cpu_s),
            max(self.loop_wall_s, other.loop_wall_s),
        )


@dataclass(frozen=True)
class Share:
    """One process's part of a step: its concurrency or rate, its phase among the processes'
    arrival times, and its part of max_requests."""

    level: float
    phase_s: float
    max_requests: int | None


async def drive(
    workload: Workload,
    step: Step,
    share: Share,
    *,
    config: LoadConfig,
    start_at: float,
    on_done: Callable[[], None] = lambda: None,
) -> StepRun:
    """Run one step's share from this event loop, starting at `start_at` (perf_counter)."""
    if (delay := start_at - time.perf_counter()) > 0:
        await asyncio.sleep(delay)
    run = StepRun(step, measure_from=start_at + config.warmup_s)
    cpu_started, wall_started = time.thread_time(), time.perf_counter()
    if step.mode == "closed":
        await _closed(workload, share, config, run, on_done)
    else:
        await _open(workload, share, config, run, on_done)
    run.loop_cpu_s = time.thread_time() - cpu_started
    run.loop_wall_s = time.perf_counter() - wall_started
    return run


async def _closed(
    workload: Workload,
    share: Share,
    config: LoadConfig,
    run: StepRun,
    on_done: Callable[[], None],
) -> None:
    window_end = run.measure_from + config.duration_s

    async def worker() -> None:
        while (sent := time.perf_counter()) < window_end:
            measured = sent >= run.measure_from
            if measured:
                if share.max_requests is not None and run.scheduled >= share.max_requests:
                    return
                run.scheduled += 1
            scenario = workload.pick()
            outcome = await workload.call(scenario)
            if measured:
                run.records.append(_record(scenario, sent, sent, outcome))
                on_done()

    await asyncio.gather(*(worker() for _ in range(int(share.level))))


async def _open(
    workload: Workload,
    share: Share,
    config: LoadConfig,
    run: StepRun,
    on_done: Callable[[], None],
) -> None:
    window_end = run.measure_from + config.duration_s
    start = run.measure_from - config.warmup_s + share.phase_s
    slots = asyncio.Semaphore(config.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    sent_measured = 0

    async def one(scenario: str, due: float, measured: bool) -> None:
        try:
            sent = time.perf_counter()
            outcome = await workload.call(scenario)
            if measured:
                run.records.append(_record(scenario, due, sent, outcome))
                on_done()
        finally:
            slots.release()

    schedule = _due_times(share, start, run.measure_from, window_end)
    for due, measured in schedule:
        run.scheduled += measured
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        if slots.locked():
            try:
                # Waiting for a slot delays this request (its latency counts from `due`) and
                # every later one; none is sent after the window closes.
                remaining = max(0.0, window_end - time.perf_counter())
                await asyncio.wait_for(slots.acquire(), remaining)
            except TimeoutError:
                break
        else:
            await slots.acquire()
        if time.perf_counter() >= window_end:
            slots.release()
            break
        sent_measured += measured
        task = asyncio.create_task(one(workload.pick(), due, measured))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    run.scheduled += sum(measured for _, measured in schedule)  # due, never sent
    run.dropped = run.scheduled - sent_measured
    if tasks:
        await asyncio.wait(tasks, timeout=config.timeout_s + DRAIN_MARGIN_S)


def _due_times(
    share: Share, start: float, measure_from: float, window_end: float
) -> Iterator[tuple[float, bool]]:
    """(due time, measured?) of every request of an open-loop share, warm-up included."""
    measured_count = 0
    for k in itertools.count():
        due = start + k / share.level
        if due >= window_end:
            return
        measured = due >= measure_from
        if measured:
            if share.max_requests is not None and measured_count >= share.max_requests:
                return
            measured_count += 1
        yield due, measured


def _record(scenario: str, due: float, sent: float, outcome: Outcome) -> Record:
    return Record(scenario, due, sent, time.perf_counter(), outcome.code, outcome.timing)


def shares(step: Step, config: LoadConfig) -> list[Share]:
    """Split a step among the processes (those left with nothing to do are left out)."""
    n = config.processes
    counts = _split(config.max_requests, n) if config.max_requests is not None else [None] * n
    if step.mode == "closed":
        levels = _split(int(step.level), n)
        return [
            Share(level, 0.0, count)
            for level, count in zip(levels, counts, strict=True)
            if level > 0 and count != 0
        ]
    return [
        Share(step.level / n, i / step.level, count) for i, count in enumerate(counts) if count != 0
    ]


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]
