"""A small FastAPI reward server: serves any in-process :class:`~uniref.rewards.sources.RewardSource` over the
HTTP reward protocol of :mod:`uniref.rewards.protocol` (needs the ``serve`` extra).

    app = create_app(SceneRewards())            # uvicorn module:app, or serve(SceneRewards(), port=8900)

Bad requests (malformed JSON, undecodable images, a sample the source cannot score) are 422 with the reason;
an exception inside the source is a 500, which clients retry. :class:`BackgroundServer` runs an app in a
thread on 127.0.0.1 (tests, or a reward server next to a training process).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI, HTTPException

from uniref.errors import UniRefError
from uniref.rewards.protocol import HEALTH_PATH, SCORE_PATH, ScoreRequest, ScoreResponse, decode_request
from uniref.rewards.sources import RewardSource

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0  # seconds to wait for a background server to accept connections
SHUTDOWN_TIMEOUT = 10.0  # seconds to wait for its thread to finish
_POLL = 0.01  # seconds between startup checks


def create_app(source: RewardSource) -> FastAPI:
    """A FastAPI app with ``POST /v1/score`` and ``GET /v1/health`` serving ``source``."""
    app = FastAPI(title="UniRef reward server", version="1")

    @app.get(HEALTH_PATH)
    def health() -> dict[str, str]:
        return {"status": "ok", "source": type(source).__name__}

    # A plain ``def``: FastAPI runs it in its thread pool, so a CPU-bound source does not block the event loop.
    @app.post(SCORE_PATH)
    def score(request: ScoreRequest) -> ScoreResponse:
        try:
            samples, outputs = decode_request(request)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        try:
            scores = source.score(samples, outputs)
        except (ValueError, UniRefError) as e:  # the source rejects these inputs: retrying will not help
            raise HTTPException(status_code=422, detail=f"{type(source).__name__}: {e}") from e
        except Exception as e:  # a crash in the source: answer 500 (clients retry) and keep the connection usable
            log.exception("reward source %s failed", type(source).__name__)
            raise HTTPException(status_code=500, detail=f"{type(source).__name__}: {type(e).__name__}: {e}") from e
        return ScoreResponse(scores=scores)

    return app


def serve(source: RewardSource, host: str = LOCALHOST, port: int = 8900) -> None:
    """Serve ``source`` until interrupted (blocking). Bind to another host than 127.0.0.1 deliberately."""
    uvicorn.run(create_app(source), host=host, port=port, log_level="info")


class BackgroundServer:
    """Runs an ASGI app with uvicorn in a daemon thread on 127.0.0.1, on a free port by default.

    with BackgroundServer(create_app(SceneRewards())) as server:
        HTTPRewardSource(server.url).score(samples, outputs)
    """

    def __init__(self, app: FastAPI, port: int = 0) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOCALHOST, port))  # port 0: the OS picks a free one; the bound socket is handed to uvicorn
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"reward server on {self.url} did not start within {STARTUP_TIMEOUT} s")
            time.sleep(_POLL)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(SHUTDOWN_TIMEOUT)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
