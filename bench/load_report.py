"""What `clipsearch bench load` makes of a step's records: the summary, its table row, the
JSON, and the plot of a sweep."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.bench.load_workload import OK

if TYPE_CHECKING:
    from clipsearch.bench.load_engine import Record, StepRun

LATE_S = 0.010
STAGES = ("queue", "preprocess", "inference", "search", "total")
# A step is flagged as limited by the load generator, not the server, when its loop kept a
# core this busy, or its throughput came this close to the generator's own ceiling.
BUSY_LOOP = 0.9
NEAR_CEILING = 0.8


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles | None:
        if not seconds:
            return None
        ms = np.asarray(seconds, dtype=np.float64) * 1000
        p50, p95, p99 = np.percentile(ms, [50, 95, 99], method="inverted_cdf")
        return cls(float(p50), float(p95), float(p99), float(ms.max()), float(ms.mean()))

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


@dataclass(frozen=True)
class StepSummary:
    mode: str
    level: float
    label: str
    duration_s: float
    scheduled: int
    completed: int
    ok: int
    errors: dict[str, int]
    dropped: int
    late: int
    throughput: float  # OK replies per second
    latency_ms: Percentiles | None  # from the due time (open loop) or the send (closed)
    round_trip_ms: Percentiles | None  # from the send
    send_lag_ms: Percentiles | None
    server_ms: dict[str, float]  # mean per stage over OK replies
    batch_size: float | None  # mean server batch size over OK replies
    loop_cpu: float  # busy fraction of the generator's loop (its busiest process)
    client_bound: str  # why the generator may be the limit; "" when it is not
    scenarios: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        def opt(p: Percentiles | None) -> dict[str, float] | None:
            return p.to_dict() if p else None

        return {
            "mode": self.mode,
            ("concurrency" if self.mode == "closed" else "rate"): self.level,
            "label": self.label,
            "duration_s": round(self.duration_s, 3),
            "scheduled": self.scheduled,
            "completed": self.completed,
            "ok": self.ok,
            "errors": self.errors,
            "dropped": self.dropped,
            "late": self.late,
            "throughput": round(self.throughput, 2),
            "latency_ms": opt(self.latency_ms),
            "round_trip_ms": opt(self.round_trip_ms),
            "send_lag_ms": opt(self.send_lag_ms),
            "server_ms": {k: round(v, 3) for k, v in self.server_ms.items()},
            "batch_size": None if self.batch_size is None else round(self.batch_size, 2),
            "loop_cpu": round(self.loop_cpu, 3),
            "client_bound": self.client_bound,
            "scenarios": self.scenarios,
        }


def summarize(run: StepRun, ceiling: StepSummary | None) -> StepSummary:
    records = run.records
    ok = [r for r in records if r.code == OK]
    ended = max((r.done for r in records), default=run.measure_from)
    duration = max(ended - run.measure_from, 1e-9)
    throughput = len(ok) / duration
    lags = [r.sent - r.due for r in records]
    timed = [r.timing for r in ok if r.timing is not None]
    server_ms = (
        {
            stage: float(np.mean([getattr(t, f"{stage}_us") for t in timed])) / 1000
            for stage in STAGES
        }
        if timed
        else {}
    )
    loop_cpu = run.loop_cpu_s / run.loop_wall_s if run.loop_wall_s > 0 else 0.0
    reasons = []
    if loop_cpu >= BUSY_LOOP:
        reasons.append(f"its loop was busy {loop_cpu:.0%} of the time")
    if ceiling is not None and 0 < NEAR_CEILING * ceiling.throughput <= throughput:
        reasons.append(
            f"{throughput:.0f}/s is {throughput / ceiling.throughput:.0%} of its own "
            f"ceiling ({ceiling.throughput:.0f}/s)"
        )
    return StepSummary(
        mode=run.step.mode,
        level=run.step.level,
        label=run.step.label,
        duration_s=duration,
        scheduled=run.scheduled,
        completed=len(records),
        ok=len(ok),
        errors=dict(Counter(r.code for r in records if r.code != OK).most_common()),
        dropped=run.dropped,
        late=sum(lag > LATE_S for lag in lags),
        throughput=throughput,
        latency_ms=Percentiles.of([r.done - r.due for r in ok]),
        round_trip_ms=Percentiles.of([r.done - r.sent for r in ok]),
        send_lag_ms=Percentiles.of(lags) if run.step.mode == "open" else None,
        server_ms=server_ms,
        batch_size=float(np.mean([t.batch_size for t in timed])) if timed else None,
        loop_cpu=loop_cpu,
        client_bound="; ".join(reasons),
        scenarios=_by_scenario(records),
    )


def _by_scenario(records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({r.scenario for r in records}):
        mine = [r for r in records if r.scenario == name]
        ok = [r.done - r.due for r in mine if r.code == OK]
        latency = Percentiles.of(ok)
        out[name] = {
            "ok": len(ok),
            "errors": len(mine) - len(ok),
            "latency_ms": latency.to_dict() if latency else None,
        }
    return out


# --- the table -----------------------------------------------------------------------------

COLUMNS = (
    ("step", 8),
    ("ok", 7),
    ("req/s", 8),
    ("p50", 8),
    ("p95", 8),
    ("p99", 8),
    ("max", 8),
    ("drop", 6),
    ("late", 6),
    ("batch", 6),
    ("queue", 7),
    ("prep", 7),
    ("infer", 7),
    ("search", 7),
    ("server", 7),
    ("rtt", 7),
    ("cpu", 5),
)


def format_table(steps: Sequence[StepSummary], header: bool = True) -> str:
    """One row per step: latency percentiles (ms, from the due time in open loop), then the
    server's mean stage times next to the mean client round trip (ms), then errors by code."""
    lines = []
    if header:
        lines.append(" ".join(f"{name:>{width}}" for name, width in COLUMNS) + "  errors")
    for s in steps:
        lat, rtt = s.latency_ms, s.round_trip_ms
        cells = [
            s.label,
            str(s.ok),
            f"{s.throughput:.1f}",
            *(_ms(getattr(lat, k) if lat else None) for k in ("p50", "p95", "p99", "max")),
            str(s.dropped),
            str(s.late),
            "-" if s.batch_size is None else f"{s.batch_size:.1f}",
            *(_ms(s.server_ms.get(stage)) for stage in STAGES),
            _ms(rtt.mean if rtt else None),
            f"{s.loop_cpu:.0%}",
        ]
        row = " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))
        errors = ", ".join(f"{code} {n}" for code, n in s.errors.items()) or "-"
        lines.append(f"{row}  {errors}")
        if s.client_bound:
            lines.append(f"{'':>8} client-bound: {s.client_bound}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


# --- the plot ------------------------------------------------------------------------------


def plot_steps(steps: Sequence[StepSummary], path: str | Path, title: str = "") -> None:
    """Throughput and latency percentiles against concurrency (closed loop) and/or rate
    (open loop), one column each, as a PNG."""
    # Imported here: matplotlib is the [bench] extra, only --plot needs it.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    modes = [m for m in ("closed", "open") if any(s.mode == m for s in steps)]
    figure, axes = plt.subplots(
        2, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 7), squeeze=False
    )
    for column, mode in enumerate(modes):
        mine = sorted((s for s in steps if s.mode == mode), key=lambda s: s.level)
        x = [s.level for s in mine]
        throughput_ax, latency_ax = axes[0][column], axes[1][column]
        throughput_ax.plot(x, [s.throughput for s in mine], "o-", label="OK replies/s")
        if mode == "open":
            throughput_ax.plot(x, x, ":", color="grey", label="offered rate")
        throughput_ax.set_ylabel("requests/s")
        throughput_ax.legend()
        for key in ("p50", "p95", "p99"):
            values = [getattr(s.latency_ms, key) if s.latency_ms else np.nan for s in mine]
            latency_ax.plot(x, values, "o-", label=key)
        latency_ax.set_ylabel("latency ms" + (" (from due time)" if mode == "open" else ""))
        latency_ax.set_yscale("log")
        latency_ax.legend()
        xlabel = "concurrency (closed loop)" if mode == "closed" else "arrival rate /s (open loop)"
        for ax in (throughput_ax, latency_ax):
            if len(x) > 1 and max(x) / min(x) >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(x, [f"{level:g}" for level in x])
            ax.minorticks_off()
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
