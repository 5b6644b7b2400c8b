"""Run the web application on uvicorn: in the foreground until Ctrl-C (`clipsearch web`,
`clipsearch demo --web`) or in a background thread (tests, embedding)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType

import uvicorn

from clipsearch.web.app import create_app
from clipsearch.web.backends import WebConfig

START_TIMEOUT_S = 30.0


class WebServer:
    """The page and API of `config` on `host:port` (port 0: any free port). The socket is
    bound at construction, so `url` is known before serving starts."""

    def __init__(
        self, config: WebConfig, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self.app = create_app(config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # connections wait in the backlog until uvicorn accepts
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level=log_level, lifespan="on", access_log=False)
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM (uvicorn re-raises the signal after
        its graceful shutdown, so Ctrl-C arrives as KeyboardInterrupt afterwards)."""
        self.server.run(sockets=[self.socket])

    def start(self) -> str:
        """Serve from a background thread; returns the URL once it accepts connections."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.socket])),
            name="clipsearch-web",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:  # uvicorn offers a flag, not an event
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server on {self.url} did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT_S)
            self._thread = None
        self.socket.close()

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
