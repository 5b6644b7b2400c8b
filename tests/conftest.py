"""Suite-wide rules."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from store_fixtures import MilvusServerProcess

ROOT = Path(__file__).resolve().parents[1]


def _keep_the_repository_root_off_sys_path() -> None:
    """`python -m pytest` (or PYTHONPATH=.) puts the repository root on sys.path, where the
    top-level folders would import under their bare names: `server.errors` next to
    `clipsearch.server.errors`, two copies of every class, so an `except` or `isinstance`
    on one misses the other. The package imports only as clipsearch.* (pyproject's
    `pythonpath`); this runs before any test module is imported."""
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
    # "tests" is the name importlib mode gives the test modules themselves.
    bare = {p.name for p in ROOT.iterdir() if p.is_dir()} - {"tests"}
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in bare)
    if leaked:
        raise pytest.UsageError(f"imported by a bare folder name before the tests: {leaked}")


_keep_the_repository_root_off_sys_path()


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


@pytest.fixture(scope="session")
def milvus_server_path() -> str:
    """The `milvus-server` executable, for tests that start (and kill) a server of their own."""
    from store_fixtures import milvus_server_executable

    executable = milvus_server_executable()
    if executable is None:
        pytest.skip("the real-server tests need milvus-server: pip install milvus (PyPI, 2.3.x)")
    return executable


@pytest.fixture(scope="session")
def milvus_server(
    tmp_path_factory: pytest.TempPathFactory, milvus_server_path: str
) -> Iterator[MilvusServerProcess]:
    """One real Milvus server, shared by the store tests of the whole session."""
    from store_fixtures import MilvusServerProcess

    with MilvusServerProcess(
        tmp_path_factory.mktemp("milvus-server"), milvus_server_path
    ) as server:
        yield server
