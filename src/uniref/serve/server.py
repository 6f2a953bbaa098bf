"""Running the app with uvicorn: in the foreground (``uniref serve``) or in a thread (tests, benchmarks).

On SIGTERM or Ctrl-C, uvicorn stops listening and waits for requests in flight; before that, our
:class:`_Server` marks the app as draining, so a request that still arrives on an open connection gets
503 and ``/healthz`` fails (a load balancer stops sending). Then the lifespan drains the batcher and the
process exits 0.
"""

from __future__ import annotations

import socket
import threading
import time
from types import FrameType, TracebackType

import uvicorn

from uniref.serve.app import ServeApp

LOCALHOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0  # seconds for a background server to accept connections
SHUTDOWN_TIMEOUT = 60.0  # seconds to wait for its thread (requests in flight finish first)
_POLL = 0.01  # seconds between startup checks


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app it is draining as soon as the exit signal arrives."""

    def __init__(self, config: uvicorn.Config, app: ServeApp) -> None:
        super().__init__(config)
        self._serve_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._serve_app.drain()
        super().handle_exit(sig, frame)


def serve(app: ServeApp, host: str = LOCALHOST, port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until SIGTERM / Ctrl-C (blocking), then finish what is in flight and return."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    _Server(config, app).run()


class ServerThread:
    """``app`` served by uvicorn in a daemon thread on 127.0.0.1, on a free port by default.

    with ServerThread(create_app(pipe)) as server:
        requests.get(server.url + "/healthz")
    """

    def __init__(self, app: ServeApp, port: int = 0) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOCALHOST, port))  # port 0: the OS picks; the bound socket is handed to uvicorn
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = _Server(config, app)
        # uvicorn installs signal handlers only in the main thread; here the thread just runs.
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server on {self.url} did not start within {STARTUP_TIMEOUT} s")
            time.sleep(_POLL)
        return self

    def stop(self) -> None:
        """As SIGTERM does: drain, stop listening, finish requests in flight, stop the batcher."""
        self.app.drain()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(SHUTDOWN_TIMEOUT)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
