"""Suite-wide rules."""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skip is a failure: the CI machine has every tool the suite can use
    (milvus-server, openssl), so a skip there means a real test silently did not run."""
    if not os.environ.get("CI") or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reasons = sorted({str(report.longrepr[-1]) for report in skipped})
        reporter.write_line(f"CI: {len(skipped)} tests were skipped: {reasons}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
