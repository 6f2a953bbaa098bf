"""The HTTP reward protocol (version 1): JSON in, JSON out, batched.

``POST /v1/score``::

    {"version": 1,
     "samples": [{"instruction": str, "task": str, "spec": {...},
                  "refs": [<base64 PNG>, ...], "target": <base64 PNG>}, ...],
     "items":   [{"sample": <index into samples>, "output": <base64 PNG>}, ...]}

→ ``{"version": 1, "scores": [{"ref_1": 0.93, ..., "instruction": 1.0, "quality": 0.81} | null, ...]}``,
one entry per item, in order; ``null`` means the server could not score that item (never a 0).

A sample is sent once however many of its outputs are scored (a GRPO group of G outputs shares one set of
references). PNG keeps images lossless, so a remote source scores exactly what an in-process one would.
``GET /v1/health`` → ``{"status": "ok", "source": <class name>}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict

from uniref.data.sample import Sample

PROTOCOL_VERSION = 1
SCORE_PATH = "/v1/score"
HEALTH_PATH = "/v1/health"


class SamplePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str
    task: str = ""
    spec: dict[str, Any] = {}
    refs: list[str]  # base64 PNG, picture order
    target: str  # base64 PNG


class ItemPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sample: int  # index into ScoreRequest.samples
    output: str  # base64 PNG


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = PROTOCOL_VERSION
    samples: list[SamplePayload]
    items: list[ItemPayload]


class ScoreResponse(BaseModel):
    version: int = PROTOCOL_VERSION
    scores: list[dict[str, float] | None]


def encode_image(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str) -> Image.Image:
    """A base64 PNG (or any format PIL reads) as an RGB image; ValueError if it is not one."""
    try:
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        img.load()
    except (binascii.Error, OSError) as e:  # PIL raises OSError subclasses for unreadable data
        raise ValueError(f"not a base64-encoded image: {e}") from e
    return img.convert("RGB")


def encode_request(samples: list[Sample], outputs: list[Image.Image]) -> dict[str, Any]:
    """The JSON body for scoring ``outputs[i]`` against ``samples[i]``; repeated sample objects are sent once."""
    index: dict[int, int] = {}
    sample_payloads: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for sample, output in zip(samples, outputs, strict=True):
        if id(sample) not in index:
            index[id(sample)] = len(sample_payloads)
            sample_payloads.append(
                {
                    "instruction": sample.instruction,
                    "task": sample.task,
                    "spec": sample.spec,
                    "refs": [encode_image(r) for r in sample.refs],
                    "target": encode_image(sample.target),
                }
            )
        items.append({"sample": index[id(sample)], "output": encode_image(output)})
    return {"version": PROTOCOL_VERSION, "samples": sample_payloads, "items": items}


def decode_request(request: ScoreRequest) -> tuple[list[Sample], list[Image.Image]]:
    """Samples (one object per sent sample, shared by its items) and outputs, item order; ValueError if bad."""
    if request.version != PROTOCOL_VERSION:
        raise ValueError(f"reward protocol version {request.version}: this server speaks {PROTOCOL_VERSION}")
    samples = [
        Sample(
            instruction=s.instruction,
            refs=[decode_image(r) for r in s.refs],
            target=decode_image(s.target),
            task=s.task,
            spec=s.spec,
        )
        for s in request.samples
    ]
    for item in request.items:
        if not 0 <= item.sample < len(samples):
            raise ValueError(f"item refers to sample {item.sample}; the request has {len(samples)}")
    return [samples[i.sample] for i in request.items], [decode_image(i.output) for i in request.items]


def parse_scores(body: Any, n: int) -> list[dict[str, float] | None]:
    """The ``scores`` of a response body, checked: n entries, each None or name → finite float. ValueError if not."""
    if not isinstance(body, dict) or body.get("version") != PROTOCOL_VERSION:
        raise ValueError(f"not a version-{PROTOCOL_VERSION} reward response")
    scores = body.get("scores")
    if not isinstance(scores, list) or len(scores) != n:
        raise ValueError(f"expected {n} scores, got {scores if not isinstance(scores, list) else len(scores)}")
    out: list[dict[str, float] | None] = []
    for entry in scores:
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in entry.items()
        ):
            raise ValueError(f"malformed score entry {entry!r}")
        out.append({k: float(v) for k, v in entry.items()})
    return out
