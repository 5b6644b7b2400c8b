"""Run `clipsearch serve` in a child process: for the demo, benchmarks and tests that want
the server exactly as users run it (its own process, signals, graceful shutdown)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


def interrupt_then_kill(
    process: subprocess.Popen[bytes], timeout_s: float, *, process_group: bool = False
) -> int:
    """SIGINT (a graceful stop), then SIGKILL, of its whole process group with
    `process_group`, if it has not exited within `timeout_s`; returns its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            if process_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            return process.wait(timeout=10)
    return process.returncode


class ServerProcessError(RuntimeError):
    pass


class ServerProcess:
    """`with ServerProcess(["--milvus-uri", path]) as server: Client(server.address)`."""

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        startup_timeout_s: float = 180.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args or [])
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.address = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="clipsearch-server-")
        self._log_path = Path(self._workdir.name) / "server.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def log(self) -> str:
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def start(self) -> str:
        ready_file = Path(self._workdir.name) / "ready"
        command = [sys.executable, "-m", "clipsearch", "serve", "--port", "0"]
        command += ["--ready-file", str(ready_file), *self.args]
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if ready_file.exists() and ready_file.read_text().strip():
                self.address = ready_file.read_text().strip()
                return self.address
            if self._process.poll() is not None:
                raise ServerProcessError(
                    f"the server exited with code {self._process.returncode} before serving:\n"
                    + self.log[-4000:]
                )
            time.sleep(0.05)
        self.stop()
        raise ServerProcessError(
            f"the server was not serving after {self.startup_timeout_s:.0f} s:\n{self.log[-4000:]}"
        )

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT (graceful drain), then SIGKILL if it does not exit in time."""
        process, self._process = self._process, None
        return 0 if process is None else interrupt_then_kill(process, timeout_s)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._workdir.cleanup()
