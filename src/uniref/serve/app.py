"""The HTTP app of ``uniref serve``: OpenAI-style routes over one :class:`EditPipeline` and a :class:`Batcher`.

    app = create_app(EditPipeline.from_pretrained("tiny"), ServeConfig(max_batch=8))

Routes: ``POST /v1/images/edits`` (OpenAI's Images API, multipart, plus UniRef's fields),
``POST /v1/plan`` (``uniref plan --json`` for uploaded images), ``GET /v1/models``, ``GET /healthz``,
``GET /metrics`` (Prometheus), and the page at ``/`` with its assets under ``/static``.

Every refusal is a JSON body in OpenAI's error shape (:mod:`uniref.serve.limits`), never a traceback.
With an API key, every route but ``/healthz`` and the page's static files needs ``Authorization:
Bearer KEY``; the page is the same file for every install, holds no data, and sends the key the user
types in with each API call (a browser cannot add that header to a page load).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from uniref.budget import plan
from uniref.cli.plan import plan_json
from uniref.errors import BudgetError, UniRefError
from uniref.images import image_size
from uniref.pipeline import EditPipeline
from uniref.serve.batcher import Batcher, BatchStats, Closed, EditJob, JobResult, QueueFull
from uniref.serve.limits import (
    HTTPInputError,
    Limits,
    Upload,
    bool_field,
    budget_arg,
    budget_field,
    check_api_key,
    error_body,
    float_field,
    int_field,
    mode_field,
    read_images,
    size_field,
    text_field,
    upload_name,
)
from uniref.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

EDITS, PLAN, MODELS, HEALTH, METRICS, PAGE = "/v1/images/edits", "/v1/plan", "/v1/models", "/healthz", "/metrics", "/"
STATIC = "/static"
ROUTES = (EDITS, PLAN, MODELS, HEALTH, METRICS, PAGE)
PUBLIC = (HEALTH, PAGE)  # and everything under STATIC
IMAGE_FIELDS = ("image", "image[]")  # the openai client sends image[] for a list, image for one file
EMA_WEIGHT = 0.2  # weight of the newest pipeline call in the running mean behind Retry-After
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever seen in metrics


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How the server batches and what it accepts."""

    model_name: str = "tiny"  # the id /v1/models reports
    max_batch: int = 8  # samples per pipeline call
    max_wait_ms: float = 25.0  # longest a request waits for others to join its batch
    max_queue: int = 64  # requests waiting at most; one more gets 429
    api_key: str | None = None  # if set, every route but /healthz and the page needs it
    limits: Limits = field(default_factory=Limits)


class BodyTooLarge(Exception):
    """The request body grew past ``max_request_bytes`` while it was being read."""


@dataclass
class _State:
    pipe: EditPipeline
    config: ServeConfig
    batcher: Batcher
    metrics: Metrics
    started: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # set on SIGTERM (uniref.serve.server): new edits get 503
    batch_seconds: float = 0.0  # running mean, for Retry-After


def create_app(pipe: EditPipeline, config: ServeConfig | None = None) -> ServeApp:
    """The ``uniref serve`` ASGI app; its lifespan starts the batcher thread and drains it on shutdown."""
    config = config or ServeConfig()
    metrics = Metrics()

    def on_batch(stats: BatchStats) -> None:
        metrics.observe_batch(stats)
        state.batch_seconds = (
            stats.seconds
            if state.batch_seconds == 0
            else (EMA_WEIGHT * stats.seconds + (1 - EMA_WEIGHT) * state.batch_seconds)
        )

    batcher = Batcher(
        pipe,
        max_batch=config.max_batch,
        max_wait=config.max_wait_ms / 1000,
        max_queue=config.max_queue,
        on_batch=on_batch,
        on_drop=metrics.dropped.inc,
    )
    state = _State(pipe, config, batcher, metrics)
    metrics.watch_queue(lambda: batcher.depth)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        # uvicorn has already waited for in-flight requests; this finishes anything still queued.
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="UniRef", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.uniref = state
    _add_error_handlers(app)
    app.mount(STATIC, StaticFiles(packages=[("uniref.serve", "static")]), name="static")
    spec = pipe.model.spec
    limits = config.limits

    @app.get(PAGE, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("uniref.serve").joinpath("static/index.html").read_text())

    @app.get(HEALTH)
    def health() -> JSONResponse:
        body = {"status": "draining" if state.draining else "ok", "model": config.model_name}
        body["queue_depth"] = batcher.depth
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get(METRICS)
    def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get(MODELS)
    def models() -> dict[str, Any]:
        model = pipe.model
        info = {
            "ref_budget": spec.ref_budget,
            "ref_floor": spec.ref_floor,
            "target_budget": spec.target_budget,
            "plan_multiple": spec.plan_multiple,
            "token_pixels": spec.token_pixels,
            "default_steps": model.default_steps,
            "default_guidance": model.default_guidance,
            "default_noise_level": model.default_noise_level,
            "attention": hasattr(model, "record_attention"),
            "max_batch": config.max_batch,
            "limits": limits.as_dict(),
        }
        entry = {"id": config.model_name, "object": "model", "created": state.started, "owned_by": "uniref"}
        return {"object": "list", "data": [entry | {"uniref": info}]}

    @app.post(PLAN)
    async def plan_route(request: Request) -> dict[str, Any]:
        form, uploads = await read_form(request, limits)
        refs = await run_in_threadpool(read_images, uploads, limits)
        budget = budget_field(form, "budget", spec.ref_budget) or spec.joint_ref_budget(len(refs))
        mode = mode_field(form, "mode", allow_round=True)
        multiple = int_field(form, "multiple", 1, 1024) or spec.plan_multiple
        token_pixels = int_field(form, "token_pixels", 1, 1024) or spec.token_pixels
        try:
            result = plan([image_size(im) for im in refs], budget, multiple, mode)
        except BudgetError as exc:
            raise HTTPInputError(400, "budget", str(exc)) from None
        return plan_json(result, [Path(u.filename) for u in uploads], token_pixels)

    @app.post(EDITS)
    async def edits(request: Request) -> Response:
        start = time.monotonic()
        if state.draining or not batcher.accepting:
            raise HTTPInputError(503, None, "the server is shutting down; retry on another instance")
        form, uploads = await read_form(request, limits)
        job = await run_in_threadpool(parse_edit, form, uploads, state)
        try:
            future = batcher.submit(job)
        except QueueFull as exc:
            raise HTTPInputError(429, None, str(exc), code="queue_full") from None
        except Closed as exc:
            raise HTTPInputError(503, None, str(exc)) from None
        result = await _result_or_disconnect(request, future)
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        data = await run_in_threadpool(lambda: [{"b64_json": _png_b64(im)} for im in result.images])
        seconds = {"queue": result.queue_seconds, **result.seconds, "total": time.monotonic() - start}
        extra: dict[str, Any] = {
            "plan": plan_json(result.plan, [Path(u.filename) for u in uploads], spec.token_pixels),
            "seconds": seconds,
            "seed": job.seed,
            "width": result.images[0].width,
            "height": result.images[0].height,
            "batch_size": result.batch_size,
        }
        if result.attention is not None:
            extra["attention"] = result.attention
        return JSONResponse({"created": int(time.time()), "data": data, "uniref": extra})

    return ServeApp(app, state)


# --- request parsing --------------------------------------------------------------------------------


async def read_form(request: Request, limits: Limits) -> tuple[dict[str, str], list[Upload]]:
    """The multipart body: text fields by name, and the ``image`` / ``image[]`` files in order."""
    content_type = request.headers.get("content-type", "")
    # A form with no file at all comes urlencoded (clients only switch to multipart for files); it then
    # fails with the K = 0 message, which says more than a content-type complaint.
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise HTTPInputError(
            415, None, f"expected a multipart/form-data body (image files and form fields), got {content_type!r}"
        )
    # Extra files are counted (and refused by name) below; this only bounds the parser's work.
    form = await request.form(max_files=4 * limits.max_refs + 16)
    fields: dict[str, str] = {}
    uploads: list[Upload] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in IMAGE_FIELDS:
                    raise HTTPInputError(400, name, f"{name}: unexpected file; send reference images as 'image'")
                data = await value.read()
                uploads.append(Upload(name, upload_name(value.filename, len(uploads) + 1), data))
            elif name in IMAGE_FIELDS:
                raise HTTPInputError(400, name, f"{name}: expected an image file upload, got a text field")
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, uploads


def parse_edit(form: dict[str, str], uploads: list[Upload], state: _State) -> EditJob:
    """Check every field of an edit request and decode its images (in a worker thread: PIL is slow)."""
    limits, spec, model = state.config.limits, state.pipe.model.spec, state.pipe.model
    prompt = text_field(form, "prompt", limits, required=True)
    assert prompt is not None
    response_format = (form.get("response_format") or "b64_json").strip()
    if response_format != "b64_json":
        raise HTTPInputError(
            400, "response_format", f"response_format {response_format!r}: only b64_json (this server keeps no files)"
        )
    if bool_field(form, "stream"):
        raise HTTPInputError(400, "stream", "stream: not supported; the whole image comes in one response")
    n = int_field(form, "n", 1, limits.max_n) or 1
    size = size_field(form, "size", spec.target_budget)
    seed = int_field(form, "seed", 0, 2**63 - 1 - limits.max_n)
    steps = int_field(form, "steps", 1, limits.max_steps)
    guidance = float_field(form, "guidance", 0.0, limits.max_guidance)
    noise_level = float_field(form, "noise_level", 0.0, limits.max_noise_level)
    budget = budget_arg(budget_field(form, "budget", spec.ref_budget))
    mode = mode_field(form, "mode", allow_round=False)
    attention = bool_field(form, "attention")
    refs = read_images(uploads, limits)
    pipe = state.pipe
    try:  # plan now, so an impossible budget is this request's 400, not a failed batch
        pipe.plan_sizes(refs, size=size, budget=budget, mode=mode)
    except BudgetError as exc:
        param = "size" if str(exc).startswith("output size") else "budget"
        raise HTTPInputError(400, param, str(exc)) from None
    return EditJob(
        instruction=prompt,
        refs=refs,
        size=size,
        n=n,
        seed=seed or 0,
        steps=steps if steps is not None else model.default_steps,
        guidance=guidance if guidance is not None else model.default_guidance,
        noise_level=noise_level if noise_level is not None else model.default_noise_level,
        budget=budget,
        mode=mode,
        attention=attention,
    )


async def _result_or_disconnect(request: Request, future: Any) -> JobResult | None:
    """The job's result, or None once the client has gone (the job is then dropped if not yet running)."""
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        try:
            return result.result()
        except HTTPInputError:
            raise
        except UniRefError as exc:
            raise HTTPInputError(400, None, str(exc)) from None
    future.cancel()  # a no-op once its batch runs: the images are then simply not sent
    result.cancel()
    return None


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn sends it when the
    # connection closes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- errors -------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPInputError)
    async def input_error(request: Request, exc: HTTPInputError) -> JSONResponse:
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if exc.status == 429:
            state: _State = request.app.state.uniref
            wait = state.batch_seconds * (state.batcher.depth / state.config.max_batch + 1)
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        limit = request.app.state.uniref.config.limits.max_request_bytes
        message = f"request body larger than the {limit:,} bytes this server accepts"
        return JSONResponse(error_body(message, status=413), status_code=413)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models and docs/serving.md"
        elif exc.status_code == 405:
            message = f"{request.method} {request.url.path}: method not allowed"
        return JSONResponse(error_body(message, status=exc.status_code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param}: {first.get('msg', 'invalid')}", param), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: the traceback goes to the server log (uvicorn prints it), never the client.
        return JSONResponse(error_body("internal server error; see the server log", status=500), status_code=500)


# --- the outermost layer: auth, body cap, metrics ------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ServeApp:
    """The FastAPI app wrapped in pure ASGI (so a route still sees its client's disconnect, which
    Starlette's BaseHTTPMiddleware would hide): checks the API key and the body size before the app
    runs, and counts every response by route and status."""

    def __init__(self, app: FastAPI, state: _State) -> None:
        self.app = app
        self.state = state

    @property
    def batcher(self) -> Batcher:
        return self.state.batcher

    @property
    def metrics(self) -> Metrics:
        return self.state.metrics

    def drain(self) -> None:
        """Refuse new edits with 503 (and fail /healthz) from now on: the server is stopping."""
        self.state.draining = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        path: str = scope["path"]
        route = path if path in ROUTES else STATIC if path.startswith(STATIC + "/") else "other"
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                await _send_json(counting_send, refusal)
                return
            await self.app(scope, self._capped(receive), counting_send)
        finally:
            self.state.metrics.observe_request(route, status, time.monotonic() - start)

    def _refuse(self, scope: Scope, path: str) -> HTTPInputError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path not in PUBLIC and not path.startswith(STATIC + "/"):
            try:
                check_api_key(headers.get("authorization"), self.state.config.api_key)
            except HTTPInputError as exc:
                return exc
        limit = self.state.config.limits.max_request_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return HTTPInputError(
                413, None, f"request body of {int(length):,} bytes; this server accepts at most {limit:,}"
            )
        return None

    def _capped(self, receive: Receive) -> Receive:
        limit, seen = self.state.config.limits.max_request_bytes, 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body with no Content-Length, or one that lied
                    raise BodyTooLarge
            return message

        return capped


async def _send_json(send: Send, exc: HTTPInputError) -> None:
    import json

    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
