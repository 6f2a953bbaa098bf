"""``uniref serve``: an OpenAI-compatible HTTP API and a web page over one :class:`~uniref.pipeline.EditPipeline`.

- :mod:`uniref.serve.app`: the routes (``/v1/images/edits``, ``/v1/plan``, ``/v1/models``, ``/healthz``,
  ``/metrics``, the page at ``/``), auth, the body cap and metrics in one pure-ASGI layer;
- :mod:`uniref.serve.batcher`: concurrent requests become packed pipeline calls (bounded queue, max wait);
- :mod:`uniref.serve.limits`: caps and the parsing of every field into a named 4xx;
- :mod:`uniref.serve.metrics`: Prometheus metrics;
- :mod:`uniref.serve.server`: uvicorn in the foreground (SIGTERM drains) or in a thread;
- ``static/``: the page (HTML, JS, CSS; no CDN, works offline).

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart, prometheus-client). See docs/serving.md.
"""

from uniref.serve.app import ServeApp, ServeConfig, create_app
from uniref.serve.batcher import Batcher, EditJob, JobResult
from uniref.serve.limits import Limits
from uniref.serve.server import ServerThread, serve

__all__ = [
    "Batcher",
    "EditJob",
    "JobResult",
    "Limits",
    "ServeApp",
    "ServeConfig",
    "ServerThread",
    "create_app",
    "serve",
]
