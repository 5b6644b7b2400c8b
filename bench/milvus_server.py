"""A real Milvus 2.3 standalone (`milvus-server`, from the PyPI package `milvus`, no Docker) in a
child process: for the fault benchmarks (`clipsearch bench faults`) and the tests.

`MilvusServerProcess` starts it on free loopback ports in its own data directory, waits a
bounded time for it to answer, and stops it with SIGINT (the way `milvus-server` expects to
be stopped); `kill()` is kill -9 of its whole process group, and `start()` again brings it
back on the same proxy port and data. Several can run on one machine at once: the embedded
etcd's client and peer ports, which `milvus-server` has no flag for, are moved to free ports
through an etcd config file (`ETCD_CONFIG_PATH`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from pymilvus import MilvusClient

from clipsearch.server.process import interrupt_then_kill

STARTUP_TIMEOUT_S = 90.0
# The internal ports of milvus-server's components (root coord, query node, ...) have fixed
# defaults: two servers on one machine would call each other's components. Each instance takes
# fresh ones and keeps them across restarts: after kill -9 the old sessions in etcd still name
# them, and the new components reach each other there instead of backing off on dead ports.
INTERNAL_PORT_FLAGS = (
    "--root-coord-port",
    "--proxy-internal-port",
    "--query-coord-port",
    "--query-node-port",
    "--index-coord-port",
    "--index-node-port",
    "--data-coord-port",
    "--data-node-port",
)
SHUTDOWN_TIMEOUT_S = 20.0
# Milvus's etcd session lease (`common.session.ttl`, default 30 s). After kill -9 the embedded
# etcd restores the dead process's exclusive coordinator sessions with a fresh lease: the new
# root/data/query coordinators cannot register until it expires, and the proxy port opens only
# after that (55-100 s with 30 s, see docs/RELIABILITY.md). A live server renews it every ttl/3.
SESSION_TTL_S = 10


# How `milvus-server` is run: its own `main()`, after one change. Before it starts the server it
# test-binds every port it was given, without SO_REUSEADDR, and silently moves to the next
# port when that fails. A port still in TIME_WAIT after kill -9 (the proxy port, whenever a
# client was connected) fails that test for 60 s, so a restart served on port + 1 and the
# caller waited on the old one until its timeout. The Go server itself sets SO_REUSEADDR.
LAUNCHER = """
import socket, sys, milvus

def try_bind_port(self, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None

milvus.MilvusServerConfig.try_bind_port = try_bind_port
sys.argv[0] = "milvus-server"
sys.exit(milvus.main())
"""


def milvus_server_executable() -> str | None:
    """The `milvus-server` script of this interpreter's environment, if installed."""
    beside_python = Path(sys.executable).with_name("milvus-server")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("milvus-server")


def required_milvus_server_executable() -> str:
    """`milvus_server_executable()`, or RuntimeError saying how to install it (benchmarks)."""
    executable = milvus_server_executable()
    if executable is None:
        raise RuntimeError("milvus-server is not installed (pip install 'milvus>=2.3.5,<2.4')")
    return executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _interpreter(script: str) -> str:
    """The Python that runs the `milvus-server` script (its #! line), else this one."""
    with contextlib.suppress(OSError), Path(script).open("rb") as file:
        first = file.readline().decode(errors="replace").strip()
        if first.startswith("#!") and "python" in first:
            return first[2:].strip().split()[0]
    return sys.executable


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class MilvusServerError(RuntimeError):
    pass


class MilvusServerProcess:
    """A `milvus-server` child process; use as a context manager."""

    def __init__(self, data_dir: Path, executable: str, session_ttl_s: int = SESSION_TTL_S) -> None:
        self.data_dir = data_dir
        self.executable = executable
        self.session_ttl_s = session_ttl_s
        self.port = free_port()
        self._internal_ports = [free_port() for _ in INTERNAL_PORT_FLAGS]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The `milvus-server` process (its children: the Milvus binary, etcd), if running."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S, new_port: bool = False) -> None:
        """Start (or start again on the same data). `new_port`: serve on a fresh proxy port
        (`uri` changes) rather than the previous one, which a restart right after a stop may
        find still taken."""
        if new_port:
            self.port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        etcd_client, etcd_peer = free_port(), free_port()
        etcd_config = self.data_dir / "embed-etcd.yaml"
        etcd_config.write_text(
            "name: clipsearch-test\n"
            f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
            f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
            f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
            f"initial-cluster: clipsearch-test=http://127.0.0.1:{etcd_peer}\n"
        )
        env = dict(os.environ, ETCD_CONFIG_PATH=str(etcd_config))
        config = self.data_dir / "milvus/configs/milvus.yaml"
        config.unlink(missing_ok=True)  # written again by this start, with the ports it chose
        command = [
            _interpreter(self.executable), "-c", LAUNCHER,
            "--data", str(self.data_dir / "milvus"),
            "--proxy-port", str(self.port),
            "--etcd-port", str(etcd_client),
            *(
                part
                for flag, port in zip(INTERNAL_PORT_FLAGS, self._internal_ports, strict=True)
                for part in (flag, str(port))
            ),
            "--extra-config", f"common.session.ttl={self.session_ttl_s}",
        ]  # fmt: skip
        with (self.data_dir / "milvus-server.out").open("wb") as out:
            # Own session: if this process dies, the server can still be found by group id.
            self._process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_until_ready(timeout_s)
        except BaseException:
            self.kill()  # it never served: nothing to stop cleanly, and SIGINT is lost this early
            raise

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error = "proxy port not open"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise MilvusServerError(f"milvus-server exited early:\n{self.log_tail()}")
            chosen = self._configured_proxy_port()
            if chosen is not None and chosen != self.port:
                raise MilvusServerError(
                    f"milvus-server chose proxy port {chosen}, not {self.port} (taken?)"
                )
            if _port_open(self.port):
                try:
                    client = MilvusClient(self.uri, timeout=5)
                    client.list_collections(timeout=5)
                    client.close()
                    return
                except Exception as exc:  # not ready yet: any error means "try again"
                    last_error = str(exc)
            time.sleep(0.3)
        raise MilvusServerError(
            f"milvus-server did not answer on {self.uri} within {timeout_s:.0f} s "
            f"({last_error}):\n{self.log_tail()}"
        )

    def _configured_proxy_port(self) -> int | None:
        """The proxy port in the config milvus-server wrote, once it has written it."""
        config = self.data_dir / "milvus/configs/milvus.yaml"
        with contextlib.suppress(OSError):
            found = re.search(r"^proxy:\n(?:(?:  .*)?\n)*?  port: (\d+)", config.read_text(), re.M)
            return int(found.group(1)) if found else None
        return None

    def log_tail(self, lines: int = 30) -> str:
        logs = [
            self.data_dir / "milvus-server.out",
            self.data_dir / "milvus/logs/milvus-stdout.log",
        ]
        tail: list[str] = []
        for log in logs:
            if log.exists():
                tail += [f"--- {log}", *log.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(tail)

    def kill(self) -> None:
        """kill -9 of the server and its children (its embedded etcd), then reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> int | None:
        """SIGINT, then wait; SIGKILL the process group only if it did not stop in time."""
        process, self._process = self._process, None
        if process is None:
            return None
        return interrupt_then_kill(process, timeout_s, process_group=True)

    def __enter__(self) -> MilvusServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
