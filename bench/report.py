"""What the ingest benchmarks share in their reports: ratios and the way a report is printed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to three places; None when either is missing (a pass that did not run)."""
    return round(a / b, 3) if a and b else None


def rounded(rate: float | None) -> float | None:
    """A rate to one place; None when the pass did not run."""
    return round(rate, 1) if rate else None


def print_report(report: Mapping[str, Any], keys: Sequence[str], as_json: bool) -> None:
    """The whole report as JSON, or its headline `keys` one per line."""
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for key in keys:
        print(f"{key:32} {report.get(key)}")
