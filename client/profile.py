"""Where the time of a call goes: client round trip vs the server's own stages.

`Client.profile()` runs a search one or more times, measuring the round trip on the client
and reading the server's `Timing` from each response. The report is a tree, like
clip-as-service's `profile()`:

    round trip                    12.40 ms  100%
    ├── network + client           2.10 ms   17%
    └── server total              10.30 ms   83%
        ├── queue                  0.50 ms    4%
        ├── preprocess             1.00 ms    8%
        ├── inference              5.00 ms   40%
        ├── search                 3.00 ms   24%
        └── unaccounted            0.80 ms    6%

With several repetitions every figure is the median over them (the first call also pays for
connecting, which a median hides). Queue, preprocess and inference of texts and images
encoded in one call may overlap; "unaccounted" is what the stages do not explain (request
parsing, serialization, scheduling), never negative.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from clipsearch.client.types import TIMING_STAGES, Timing


@dataclass(frozen=True)
class Sample:
    round_trip_us: int
    timing: Timing


@dataclass(frozen=True)
class Profile:
    """Round-trip and server timings of `len(samples)` identical calls."""

    description: str
    samples: tuple[Sample, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a profile needs at least one sample")

    def _median(self, values: Sequence[int]) -> float:
        return float(statistics.median(values))

    @property
    def round_trip_us(self) -> float:
        return self._median([s.round_trip_us for s in self.samples])

    @property
    def server_us(self) -> float:
        return self._median([s.timing.total_us for s in self.samples])

    def stage_us(self, stage: str) -> float:
        return self._median([s.timing.stage_us(stage) for s in self.samples])

    @property
    def network_us(self) -> float:
        """Round trip not spent in the server: network, (de)serialization, client code."""
        return max(0.0, self.round_trip_us - self.server_us)

    @property
    def unaccounted_us(self) -> float:
        return max(0.0, self.server_us - sum(self.stage_us(stage) for stage in TIMING_STAGES))

    @property
    def batch_size(self) -> int:
        return max(s.timing.batch_size for s in self.samples)

    def to_dict(self) -> dict[str, float | int | str]:
        data: dict[str, float | int | str] = {
            "description": self.description,
            "calls": len(self.samples),
            "round_trip_us": self.round_trip_us,
            "network_us": self.network_us,
            "server_us": self.server_us,
        }
        for stage in TIMING_STAGES:
            data[f"{stage}_us"] = self.stage_us(stage)
        data["unaccounted_us"] = self.unaccounted_us
        data["batch_size"] = self.batch_size
        return data

    def render(self) -> str:
        """The breakdown as a tree, one line per part, with its share of the round trip."""
        total = self.round_trip_us
        rows: list[tuple[str, float]] = [
            ("round trip", total),
            ("├── network + client", self.network_us),
            ("└── server total", self.server_us),
        ]
        stages = [(stage, self.stage_us(stage)) for stage in TIMING_STAGES]
        stages.append(("unaccounted", self.unaccounted_us))
        for index, (name, value) in enumerate(stages):
            branch = "└──" if index == len(stages) - 1 else "├──"
            rows.append((f"    {branch} {name}", value))
        width = max(len(label) for label, _ in rows) + 2
        lines = [f"{self.description}"]
        for label, value in rows:
            share = 100.0 * value / total if total > 0 else 0.0
            lines.append(f"{label:<{width}}{value / 1000:9.2f} ms {share:5.0f}%")
        calls = len(self.samples)
        summary = "1 call" if calls == 1 else f"median of {calls} calls"
        round_trips = sorted(s.round_trip_us for s in self.samples)
        if calls > 1:
            summary += (
                f"; round trip min {round_trips[0] / 1000:.2f} ms,"
                f" max {round_trips[-1] / 1000:.2f} ms"
            )
        lines.append(f"{summary}; batch size {self.batch_size}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()
