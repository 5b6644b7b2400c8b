"""`clipsearch bench load`: a load generator for a running server.

A sweep of steps, closed loop (`--concurrency 1,4,16`) and/or open loop (`--rate 50,100`);
load_engine.py runs a step, load_report.py makes its table row, JSON and plot. One process
drives the requests from one asyncio loop through `AsyncClient`; `processes` > 1 splits each
step across that many processes when one Python loop cannot make the load. Before the sweep
the generator measures its own ceiling (the cheapest RPC, Info, at the sweep's highest
concurrency); a step near that ceiling, or whose loop kept a core busy, is flagged as
client-bound. Open-loop requests sent more than LATE_S after their due time count as late.

Load goes to loopback addresses only unless `allow_remote` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import multiprocessing
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from clipsearch.bench.load_engine import LoadConfig, Share, Step, StepRun, drive, shares
from clipsearch.bench.load_report import (
    LATE_S,
    StepSummary,
    format_table,
    plot_steps,
    summarize,
)
from clipsearch.bench.load_workload import SCENARIOS, TRIVIAL, Payloads, Workload, parse_mix
from clipsearch.client.aio import AsyncClient
from clipsearch.client.errors import ClipsearchError

CEILING_SECONDS = 2.0
CEILING_MAX_CONCURRENCY = 64


class RemoteAddressError(ValueError):
    pass


@dataclass
class LoadReport:
    config: LoadConfig
    server_info: dict[str, Any]
    ceiling: StepSummary | None
    steps: list[StepSummary]
    mean_image_bytes: float

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "server": c.server,
            "model": self.server_info,
            "scenario": c.scenario_label,
            "mix": dict(c.mix),
            "collection": c.collection,
            "config": {
                "duration_s": c.duration_s,
                "warmup_s": c.warmup_s,
                "max_requests": c.max_requests,
                "max_in_flight": c.max_in_flight,
                "timeout_s": c.timeout_s,
                "top_k": c.top_k,
                "image_size": c.image_size,
                "mean_image_bytes": round(self.mean_image_bytes),
                "ingest_items": c.ingest_items,
                "processes": c.processes,
                "late_ms": LATE_S * 1000,
            },
            "ceiling": self.ceiling.to_dict() if self.ceiling else None,
            "steps": [step.to_dict() for step in self.steps],
        }


# --- addresses -----------------------------------------------------------------------------


def target_host(address: str) -> str | None:
    """The host of a gRPC target ("host:port", "[::1]:port", "ipv4:...", "dns:///..."); None
    for a Unix socket."""
    if address.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
            break
    address = address.split(",")[0]
    if address.startswith("["):
        return address[1 : address.index("]")]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def check_loopback(address: str) -> None:
    """Raise RemoteAddressError unless every address `address` resolves to is loopback."""
    host = target_host(address)
    if host is None:
        return
    try:
        resolved = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise RemoteAddressError(f"cannot resolve {host!r}: {exc}") from None
    remote = sorted(a for a in resolved if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise RemoteAddressError(
            f"{address} is not a loopback address ({', '.join(remote)}): this load generator "
            "only loads this machine unless --allow-remote is given"
        )


# --- running a sweep -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShareJob:
    """Everything a worker process needs to run its share of a step."""

    config: LoadConfig
    mix: tuple[tuple[str, float], ...]
    payloads: Payloads
    step: Step
    share: Share
    start_at: float
    seed: int


_progress_counter: Any = None


def _init_worker(counter: Any) -> None:
    global _progress_counter  # noqa: PLW0603  # one per worker process, set once
    _progress_counter = counter


def _worker_ready() -> None:
    time.sleep(0.2)  # long enough that each of the first jobs lands on its own worker


def _count_one() -> None:
    with _progress_counter.get_lock():
        _progress_counter.value += 1


def _run_share_job(job: ShareJob) -> StepRun:
    async def main() -> StepRun:
        async with _client(job.config) as client:
            workload = _workload(client, job.config, job.mix, job.payloads, job.seed)
            return await drive(
                workload,
                job.step,
                job.share,
                config=job.config,
                start_at=job.start_at,
                on_done=_count_one,
            )

    return asyncio.run(main())


def _client(config: LoadConfig) -> AsyncClient:
    # No automatic retries: a load test reports UNAVAILABLE, it does not hide it.
    return AsyncClient(config.server, timeout=config.timeout_s, token=config.token, retry=False)


def _workload(
    client: AsyncClient,
    config: LoadConfig,
    mix: Sequence[tuple[str, float]],
    payloads: Payloads,
    seed: int,
) -> Workload:
    return Workload(
        client,
        mix,
        payloads,
        collection=config.collection,
        top_k=config.top_k,
        ingest_items=config.ingest_items,
        seed=seed,
    )


class Runner:
    """Runs steps in this process's event loop, or split across worker processes."""

    def __init__(self, config: LoadConfig, payloads: Payloads) -> None:
        self.config = config
        self.payloads = payloads
        self._pool: ProcessPoolExecutor | None = None
        self._counter: Any = None
        self._client: AsyncClient | None = None

    async def __aenter__(self) -> Runner:
        if self.config.processes > 1:
            context = multiprocessing.get_context("spawn")
            self._counter = context.Value("q", 0)
            self._pool = ProcessPoolExecutor(
                self.config.processes,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self._counter,),
            )
            # Start every worker (and its imports, seconds) now, not inside a step's window.
            loop = asyncio.get_running_loop()
            ready = [
                loop.run_in_executor(self._pool, _worker_ready)
                for _ in range(self.config.processes)
            ]
            await asyncio.gather(*ready)
        else:
            self._client = _client(self.config)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    async def run(
        self, step: Step, mix: tuple[tuple[str, float], ...], config: LoadConfig | None = None
    ) -> StepRun:
        config = config or self.config
        parts = shares(step, config)
        bar = self._bar(step, config, mix)
        try:
            if self._pool is None:
                assert self._client is not None
                workload = _workload(self._client, config, mix, self.payloads, config.seed)
                return await drive(
                    workload,
                    step,
                    parts[0],
                    config=config,
                    start_at=time.perf_counter(),
                    on_done=lambda: bar.update(1),
                )
            return await self._run_in_pool(step, mix, config, parts, bar)
        finally:
            bar.close()

    async def _run_in_pool(
        self,
        step: Step,
        mix: tuple[tuple[str, float], ...],
        config: LoadConfig,
        parts: list[Share],
        bar: tqdm,
    ) -> StepRun:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        with self._counter.get_lock():
            self._counter.value = 0
        start_at = time.perf_counter() + 0.5  # every worker starts at once
        futures = [
            loop.run_in_executor(
                self._pool,
                _run_share_job,
                ShareJob(config, mix, self.payloads, step, part, start_at, config.seed + i),
            )
            for i, part in enumerate(parts)
        ]
        gathered = asyncio.gather(*futures)
        while not gathered.done():
            await asyncio.wait([gathered], timeout=0.2)
            bar.update(self._counter.value - bar.n)
        runs: list[StepRun] = gathered.result()
        merged = runs[0]
        for other in runs[1:]:
            merged = merged.merge(other)
        return merged

    def _bar(self, step: Step, config: LoadConfig, mix: tuple[tuple[str, float], ...]) -> tqdm:
        total = config.max_requests
        if step.mode == "open":
            due = math.ceil(config.duration_s * step.level)
            total = due if total is None else min(total, due)
        name = mix[0][0] if len(mix) == 1 else "mix"
        return tqdm(
            total=total,
            desc=f"{name} {step.label}",
            unit="req",
            leave=False,
            disable=not config.progress,
            file=sys.stderr,
        )


async def run_load_async(
    config: LoadConfig,
    steps: Sequence[Step],
    on_step: Callable[[StepSummary], None] = lambda summary: None,
    on_ceiling: Callable[[StepSummary], None] = lambda summary: None,
) -> LoadReport:
    """Measure the generator's ceiling (unless config.ceiling is off), then every step."""
    if not config.allow_remote:
        check_loopback(config.server)
    async with _client(config) as client:
        info = await client.wait_until_ready(timeout=config.timeout_s)
    server_info = {
        "name": info.model_name,
        "id": info.model_id,
        "dim": info.dim,
        "precision": info.vision.precision,
        "providers": list(info.vision.providers),
        "store": info.store,
        "version": info.version,
    }
    payloads = await asyncio.to_thread(
        Payloads.build,
        config.scenario_names,
        dim=info.dim,
        image_size=config.image_size,
        seed=config.seed,
    )
    summaries: list[StepSummary] = []
    ceiling = None
    async with Runner(config, payloads) as runner:
        if config.ceiling and steps:
            ceiling = summarize(await runner.run(*_ceiling_step(config, steps)), None)
            on_ceiling(ceiling)
        for step in steps:
            summary = summarize(await runner.run(step, config.mix), ceiling)
            summaries.append(summary)
            on_step(summary)
    return LoadReport(config, server_info, ceiling, summaries, payloads.mean_image_bytes)


def _ceiling_step(
    config: LoadConfig, steps: Sequence[Step]
) -> tuple[Step, tuple[tuple[str, float], ...], LoadConfig]:
    closed = [s.level for s in steps if s.mode == "closed"]
    concurrency = min(CEILING_MAX_CONCURRENCY, int(max(closed)) if closed else config.max_in_flight)
    ceiling_config = replace(
        config,
        duration_s=min(CEILING_SECONDS, config.duration_s),
        warmup_s=min(0.5, config.warmup_s),
        max_requests=None,
    )
    return Step("closed", concurrency), ((TRIVIAL, 1.0),), ceiling_config


def run_load(
    config: LoadConfig,
    steps: Sequence[Step],
    on_step: Callable[[StepSummary], None] = lambda summary: None,
    on_ceiling: Callable[[StepSummary], None] = lambda summary: None,
) -> LoadReport:
    return asyncio.run(run_load_async(config, steps, on_step, on_ceiling))


# --- the command ---------------------------------------------------------------------------


def parse_levels(text: str, kind: Callable[[str], float]) -> list[float]:
    levels = [kind(part) for part in text.split(",") if part.strip()]
    if not levels or any(level <= 0 for level in levels):
        raise ValueError(f"expected a comma-separated list of positive numbers, got {text!r}")
    return levels


def steps_from_args(args: argparse.Namespace) -> list[Step]:
    steps: list[Step] = []
    if args.concurrency:
        steps += [Step("closed", c) for c in parse_levels(args.concurrency, int)]
    if args.rate:
        steps += [Step("open", r) for r in parse_levels(args.rate, float)]
    return steps or [Step("closed", c) for c in (1, 4, 16, 64)]


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    mix = parse_mix(args.mix) if args.mix else ((args.scenario, 1.0),)
    for name, value in (
        ("--duration", args.duration),
        ("--timeout", args.timeout),
        ("--max-in-flight", args.max_in_flight),
        ("--processes", args.processes),
        ("--ingest-items", args.ingest_items),
        ("--image-size", args.image_size),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if args.warmup < 0 or (args.max_requests is not None and args.max_requests < 1):
        raise ValueError("--warmup must be >= 0 and --max-requests >= 1")
    return LoadConfig(
        server=args.server,
        mix=mix,
        collection=args.collection,
        top_k=args.top_k,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.max_requests,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout,
        token=args.token,
        image_size=args.image_size,
        ingest_items=args.ingest_items,
        processes=args.processes,
        seed=args.seed,
        progress=not args.no_progress,
        ceiling=not args.no_ceiling,
        allow_remote=args.allow_remote,
    )


def report_out(report: LoadReport, args: argparse.Namespace) -> None:
    """The tables (stdout, or stderr under --json), the JSON, and the plot."""
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    if args.plot:
        plot_steps(report.steps, args.plot, title=_title(report))
        print(f"bench load: plot written to {args.plot}", file=sys.stderr)


def _title(report: LoadReport) -> str:
    return f"{report.config.scenario_label} on {report.server_info.get('name', '?')}"


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        steps = steps_from_args(args)
    except ValueError as exc:
        print(f"bench load: {exc}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout
    printed: list[StepSummary] = []

    def on_step(summary: StepSummary) -> None:
        print(format_table([summary], header=not printed), file=out, flush=True)
        printed.append(summary)

    def on_ceiling(ceiling: StepSummary) -> None:
        print(
            f"load generator ceiling: {ceiling.throughput:.0f} Info calls/s at "
            f"c{int(ceiling.level)} from {config.processes} process(es), loop busy "
            f"{ceiling.loop_cpu:.0%}",
            file=out,
            flush=True,
        )

    try:
        report = run_load(config, steps, on_step, on_ceiling)
    except RemoteAddressError as exc:
        print(f"bench load: {exc}", file=sys.stderr)
        return 2
    except ClipsearchError as exc:
        print(f"bench load: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    with contextlib.suppress(BrokenPipeError):
        report_out(report, args)
    return 0


__all__ = [
    "SCENARIOS",
    "LoadConfig",
    "LoadReport",
    "RemoteAddressError",
    "Step",
    "check_loopback",
    "main",
    "run_load",
]
