"""``uniref serve``: the OpenAI-compatible HTTP API and web page (needs the ``serve`` extra)."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from uniref.cli import app, warnings_to_stderr
from uniref.cli.edit import DTYPES, device_kwargs
from uniref.errors import UniRefError

LOCALHOST = "127.0.0.1"


@app.command("serve")
def serve_command(
    model: Annotated[str, typer.Option(help="tiny (embedded default), tiny-random, or a model folder")] = "tiny",
    host: Annotated[str, typer.Option(help="address to listen on; 127.0.0.1 keeps it on this machine")] = LOCALHOST,
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="samples per packed pipeline call")] = 8,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="longest a request waits for others to share its call")
    ] = 25.0,
    api_key: Annotated[
        str | None,
        typer.Option(help="require 'Authorization: Bearer KEY' on every route but /healthz", envvar="UNIREF_API_KEY"),
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="requests waiting at most; more get 429")] = 64,
    max_refs: Annotated[int, typer.Option(min=1, help="reference images per request")] = 8,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="MiB per uploaded file (413 above)")] = 20.0,
    max_request_mb: Annotated[float, typer.Option(min=0.001, help="MiB per request body (413 above)")] = 64.0,
    max_pixels: Annotated[int, typer.Option(min=1, help="pixels per decoded image (decompression bombs)")] = (
        40_000_000
    ),
    max_prompt_chars: Annotated[int, typer.Option(min=1, help="characters per instruction")] = 2000,
    device: Annotated[str, typer.Option(help="auto (CUDA when there is one), cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on a CUDA GPU that has it, else fp32), fp32, bf16 or fp16")
    ] = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve POST /v1/images/edits (OpenAI Images API), /v1/plan, /v1/models, /healthz, /metrics and
    the web page at /, batching concurrent requests into packed pipeline calls."""
    try:
        from uniref.pipeline import EditPipeline
        from uniref.serve import Limits, ServeConfig, create_app, serve
    except ImportError as exc:
        raise UniRefError(f"uniref serve needs the serve extra: pip install 'uniref[serve]' ({exc})") from None

    if dtype not in DTYPES:
        raise UniRefError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    placement = device_kwargs(device)
    mib = 1024 * 1024
    limits = Limits(
        max_refs=max_refs,
        max_upload_bytes=int(max_upload_mb * mib),
        max_request_bytes=int(max_request_mb * mib),
        max_pixels=max_pixels,
        max_prompt_chars=max_prompt_chars,
    )
    with warnings_to_stderr():
        pipe = EditPipeline.from_pretrained(model, dtype=dtype, **placement)
    name = Path(model).name if Path(model).is_dir() else model
    config = ServeConfig(
        model_name=name,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        api_key=api_key or None,
        limits=limits,
    )
    if host not in (LOCALHOST, "localhost", "::1") and api_key is None:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    # uvicorn re-raises the SIGTERM it handled once requests in flight are done; a clean drain exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    typer.echo(f"uniref serve: {name} on http://{host}:{port} (page at /, API under /v1)", err=True)
    serve(create_app(pipe, config), host=host, port=port, log_level=log_level)
