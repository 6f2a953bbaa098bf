"""``uniref serve``: the OpenAI-compatible API, the batcher, limits, metrics, SIGTERM and a Qwen folder.

Everything runs on ``tiny-random`` at the tiny model's 64² budgets with 2 steps, so each test takes
about a second; servers bind 127.0.0.1 on a free port.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from starlette.testclient import TestClient

from uniref.budget import Size
from uniref.errors import ImageInputError
from uniref.images import load_image
from uniref.pipeline import EditPipeline
from uniref.serve import Batcher, EditJob, Limits, ServeConfig, ServerThread, create_app
from uniref.serve.limits import label

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "put the red circle from picture 2 on the background of picture 1"
STEPS = 2


@pytest.fixture(scope="module")
def pipe() -> EditPipeline:
    return EditPipeline.from_pretrained("tiny-random")


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def files(*images: bytes, field: str = "image") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"ref{i}.png", data, "image/png")) for i, data in enumerate(images, start=1)]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def client_for(pipe: EditPipeline, **config: object) -> TestClient:
    return TestClient(create_app(pipe, ServeConfig(model_name="tiny-random", **config)))  # type: ignore[arg-type]


def alone(pipe: EditPipeline, prompt: str, refs: list[bytes], seed: int, size: Size | None = None) -> np.ndarray:
    images = [Image.open(io.BytesIO(r)).convert("RGB") for r in refs]
    out = pipe.generate(prompt, images, size, steps=STEPS, seed=seed, progress=False).images[0]
    return np.asarray(out, dtype=np.int16)


# --- the OpenAI client ----------------------------------------------------------------------------


def test_official_openai_client_edits_with_several_images_and_extra_fields(pipe: EditPipeline) -> None:
    refs = [png(40, 30, 1), png(20, 30, 2)]
    with ServerThread(create_app(pipe, ServeConfig(model_name="tiny-random", api_key="sk-test"))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-random"]
        response = client.images.edit(
            model="tiny-random",
            image=[("a.png", refs[0], "image/png"), ("b.png", refs[1], "image/png")],
            prompt=PROMPT,
            n=2,
            size="64x48",
            response_format="b64_json",
            extra_body={"seed": 3, "steps": STEPS},
        )
        with pytest.raises(openai.BadRequestError, match=r"image #1 'bad.png': not an image"):
            client.images.edit(image=("bad.png", b"not an image", "image/png"), prompt=PROMPT)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert response.data is not None and len(response.data) == 2
    extra = response.model_extra or {}
    assert [i["path"] for i in extra["uniref"]["plan"]["images"]] == ["a.png", "b.png"]
    assert set(extra["uniref"]["seconds"]) >= {"queue", "encode", "denoise", "decode", "total"}
    for i, item in enumerate(response.data):  # image i of the request is seed 3 + i, as alone
        assert item.b64_json is not None
        got = decode(item.b64_json)
        assert got.shape == (48, 64, 3)
        assert np.abs(got - alone(pipe, PROMPT, refs, 3 + i, Size(64, 48))).max() <= 1


# --- the batcher ----------------------------------------------------------------------------------

MIXED = [  # (prompt, references, size, seed): K = 1..3, different sizes
    ("make it red", [png(40, 24, 1)], None, 11),
    (PROMPT, [png(16, 16, 2), png(30, 20, 3), png(20, 36, 4)], Size(32, 16), 12),
    ("swap", [png(24, 24, 5), png(48, 16, 6)], None, 13),
]


def test_concurrent_requests_share_one_call_and_equal_each_request_alone(pipe: EditPipeline) -> None:
    app = create_app(pipe, ServeConfig(model_name="tiny-random", max_batch=8, max_wait_ms=1500))
    with TestClient(app) as client:
        out: dict[int, dict] = {}

        def send(i: int) -> None:
            prompt, refs, size, seed = MIXED[i]
            data = {"prompt": prompt, "seed": str(seed), "steps": str(STEPS)}
            if size is not None:
                data["size"] = f"{size.width}x{size.height}"
            out[i] = client.post("/v1/images/edits", files=files(*refs), data=data).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(MIXED))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = client.get("/metrics").text
    assert all(out[i]["uniref"]["batch_size"] == len(MIXED) for i in out), [out[i].get("uniref") for i in out]
    assert "uniref_batch_size_count 1.0" in metrics  # one pipeline call served all three
    for i, (prompt, refs, size, seed) in enumerate(MIXED):
        assert np.abs(decode(out[i]["data"][0]["b64_json"]) - alone(pipe, prompt, refs, seed, size)).max() <= 1


def test_a_noise_level_request_samples_with_the_sde_as_the_pipeline_does(pipe: EditPipeline) -> None:
    refs = [png(24, 16, 7)]
    with client_for(pipe) as client:
        info = client.get("/v1/models").json()["data"][0]["uniref"]
        outs = [
            decode(_post(client, files(*refs), seed="5", noise_level=level).json()["data"][0]["b64_json"])
            for level in ("0", "0.8")
        ]
    assert info["default_noise_level"] == pipe.model.default_noise_level == 0.0
    images = [Image.open(io.BytesIO(r)).convert("RGB") for r in refs]
    sde = pipe.generate(PROMPT, images, steps=STEPS, seed=5, noise_level=0.8, progress=False).images[0]
    assert np.abs(outs[1] - np.asarray(sde, dtype=np.int16)).max() <= 1
    assert np.abs(outs[0] - alone(pipe, PROMPT, refs, 5)).max() <= 1
    assert np.abs(outs[0] - outs[1]).max() > 1


def _job(steps: int, seed: int = 0, n: int = 1) -> EditJob:
    return EditJob(instruction="make it red", refs=[Image.new("RGB", (24, 16), "red")], n=n, seed=seed, steps=steps)


def test_batcher_groups_what_can_share_a_call_and_caps_the_batch(pipe: EditPipeline) -> None:
    calls: list[tuple[int, int]] = []
    batcher = Batcher(pipe, max_batch=3, max_wait=0.5, on_batch=lambda s: calls.append((s.samples, s.requests)))
    jobs = [_job(2), _job(3), _job(2, n=2), _job(2), _job(3)]
    futures = [batcher.submit(j) for j in jobs]  # all queued before the worker starts
    batcher.start()
    results = [f.result(timeout=30) for f in futures]
    batcher.close()
    # steps 2: the first request and the n=2 one fill 3 samples; the last steps-2 request runs next
    assert sorted(calls) == sorted([(3, 2), (2, 2), (1, 1)])
    assert [r.batch_size for r in results] == [3, 2, 3, 1, 2]
    assert [len(r.images) for r in results] == [1, 1, 2, 1, 1]


def test_full_queue_is_429_with_retry_after(pipe: EditPipeline) -> None:
    app = create_app(pipe, ServeConfig(model_name="tiny-random", max_queue=1, max_wait_ms=1500))
    with TestClient(app) as client:
        first: dict[str, int] = {}
        data = {"prompt": PROMPT, "steps": str(STEPS)}
        waiting = threading.Thread(
            target=lambda: first.update(
                status=client.post("/v1/images/edits", files=files(png(8, 8)), data=data).status_code
            )
        )
        waiting.start()
        deadline = time.monotonic() + 5
        while app.batcher.depth == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = client.post("/v1/images/edits", files=files(png(8, 8)), data=data)
        waiting.join()
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert first["status"] == 200


def test_client_that_disconnects_is_dropped_before_its_batch(pipe: EditPipeline) -> None:
    app = create_app(pipe, ServeConfig(model_name="tiny-random", max_wait_ms=1000))
    with ServerThread(app) as server:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                server.url + "/v1/images/edits",
                files=files(png(8, 8)),
                data={"prompt": PROMPT, "steps": str(STEPS)},
                timeout=0.3,
            )
        time.sleep(1.2)  # past the request's max wait: its batch would have run by now
        metrics = httpx.get(server.url + "/metrics").text
    assert "uniref_dropped_total 1.0" in metrics
    assert "uniref_batch_size_count 0.0" in metrics


# --- limits and bad input ---------------------------------------------------------------------------


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels, with (almost) no data: a decompression bomb's
    shape without its cost."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _truncated() -> bytes:
    data = png(64, 64, 7)
    return data[: len(data) // 2]


BAD_FILES = [  # (bytes, what the message says, status): the CLI's corpus (tests/test_images.py)
    (b"", "empty file (0 bytes)", 400),
    (_truncated(), "truncated or corrupt image", 400),
    (b"hello, not an image", "not an image PIL can read", 400),
    (bomb_png(), "decompression bomb", 413),
]


@pytest.mark.parametrize(("data", "problem", "status"), BAD_FILES, ids=["empty", "truncated", "not_image", "bomb"])
def test_bad_input_corpus_gets_the_cli_message_naming_field_and_file(
    pipe: EditPipeline, tmp_path: Path, data: bytes, problem: str, status: int
) -> None:
    with client_for(pipe) as client:
        form = [("image", ("good.png", png(16, 16), "image/png")), ("image", ("cup.png", data, "image/png"))]
        response = client.post("/v1/images/edits", files=form, data={"prompt": PROMPT, "steps": str(STEPS)})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == "image" and error["file"] == "cup.png"
    assert error["message"].startswith(f"{label(2, 'cup.png')}: ") and problem in error["message"]
    assert "Traceback" not in response.text and "\n" not in error["message"]
    if status == 400:  # the same words `uniref edit --ref cup.png` prints
        path = tmp_path / "cup.png"
        path.write_bytes(data)
        with pytest.raises(ImageInputError) as cli:
            load_image(path)
        assert error["message"] == str(cli.value).replace(str(path), label(2, "cup.png"))


def _odd_images(tmp_path: Path) -> dict[str, bytes]:
    """The CLI corpus's good-but-unusual files: CMYK, 16-bit grey, palette, EXIF-rotated."""
    out: dict[str, bytes] = {}
    buf = io.BytesIO()
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(buf, format="JPEG")
    out["cmyk.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16)).save(buf, format="PNG")
    out["grey16.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (26, 18), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="PNG")
    out["palette.png"] = buf.getvalue()
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: 40x20 stored, 20x40 seen
    Image.new("RGB", (40, 20), (255, 0, 0)).save(buf, format="JPEG", exif=exif)
    out["rotated.jpg"] = buf.getvalue()
    return out


def test_cmyk_16_bit_palette_and_exif_rotated_images_are_accepted(pipe: EditPipeline, tmp_path: Path) -> None:
    odd = _odd_images(tmp_path)
    form = [("image", (name, data, "application/octet-stream")) for name, data in odd.items()]
    with client_for(pipe) as client:
        plan = client.post("/v1/plan", files=form)
        edit = client.post("/v1/images/edits", files=form, data={"prompt": PROMPT, "steps": str(STEPS)})
    assert plan.status_code == 200 and edit.status_code == 200, (plan.text, edit.text[:300])
    for item, (name, data) in zip(plan.json()["images"], odd.items(), strict=True):
        (tmp_path / name).write_bytes(data)
        assert item["path"] == name
        assert (item["width"], item["height"]) == load_image(tmp_path / name).size
    assert (plan.json()["images"][3]["width"], plan.json()["images"][3]["height"]) == (20, 40)
    assert edit.json()["uniref"]["plan"] == plan.json()


def _post(client: TestClient, form: list, **data: str) -> httpx.Response:
    return client.post("/v1/images/edits", files=form, data={"prompt": PROMPT, "steps": str(STEPS)} | data)


@pytest.mark.parametrize(
    ("limits", "form", "data", "status", "param", "needle"),
    [
        ({"max_refs": 2}, files(png(8, 8), png(8, 8), png(8, 8)), {}, 400, "image", "at most 2 per request"),
        ({"max_upload_bytes": 100}, files(png(32, 32)), {}, 413, "image", "bytes allowed per file"),
        ({"max_pixels": 100}, files(png(11, 10)), {}, 413, "image", "11x10 = 110 pixels"),
        ({"max_prompt_chars": 10}, files(png(8, 8)), {}, 400, "prompt", "at most 10"),
        ({}, [], {}, 400, "image", "K = 0"),
        ({}, files(png(8, 8)), {"prompt": " "}, 400, "prompt", "missing or empty"),
        ({}, files(png(8, 8)), {"n": "99"}, 400, "n", "n 99: must be from 1 to 4"),
        ({}, files(png(8, 8)), {"steps": "0"}, 400, "steps", "steps 0: must be from 1"),
        ({}, files(png(8, 8)), {"steps": "two"}, 400, "steps", "expected a whole number"),
        ({}, files(png(8, 8)), {"guidance": "nan"}, 400, "guidance", "must be from 0"),
        ({}, files(png(8, 8)), {"noise_level": "-0.5"}, 400, "noise_level", "must be from 0 to 2"),
        ({}, files(png(8, 8)), {"seed": "-1"}, 400, "seed", "seed -1"),
        ({}, files(png(8, 8)), {"mode": "global_round"}, 400, "mode", "choose one of global, per_image"),
        ({}, files(png(8, 8), png(8, 8)), {"budget": "8"}, 400, "budget", "cannot fit"),
        ({}, files(png(8, 8)), {"budget": "huge"}, 400, "budget", "expected a side length"),
        ({}, files(png(8, 8)), {"budget": "1024"}, 400, "budget", "the server allows up to 4x that"),
        ({}, files(png(8, 8)), {"size": "4000x4000"}, 400, "size", "the server allows up to 4x that"),
        ({}, files(png(8, 8)), {"size": "wide"}, 400, "size", "expected WIDTHxHEIGHT"),
        ({}, files(png(8, 8)), {"size": "4x4"}, 400, "size", "at least 8 px"),
        ({}, files(png(8, 8)), {"response_format": "url"}, 400, "response_format", "only b64_json"),
        ({}, files(png(8, 8)), {"stream": "true"}, 400, "stream", "not supported"),
        ({}, files(png(8, 8), field="mask"), {}, 400, "mask", "unexpected file"),
        ({}, files(png(8, 8)), {"image": "cat.png"}, 400, "image", "expected an image file upload"),
    ],
)
def test_every_bad_field_is_a_4xx_naming_the_field_and_problem(
    pipe: EditPipeline, limits: dict, form: list, data: dict, status: int, param: str, needle: str
) -> None:
    with client_for(pipe, limits=Limits(**limits)) as client:
        response = _post(client, form, **data)
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == param and needle in error["message"], error
    assert "Traceback" not in response.text


def test_request_body_cap_refuses_before_reading(pipe: EditPipeline) -> None:
    with client_for(pipe, limits=Limits(max_request_bytes=1000)) as client:
        response = _post(client, files(png(64, 64)))
        wrong_type = client.post("/v1/images/edits", json={"prompt": PROMPT})
        unknown = client.get("/v1/nothing")
    assert response.status_code == 413 and "at most 1,000" in response.json()["error"]["message"]
    assert wrong_type.status_code == 415 and "multipart/form-data" in wrong_type.json()["error"]["message"]
    assert unknown.status_code == 404 and "no route GET /v1/nothing" in unknown.json()["error"]["message"]


def test_api_key_guards_every_route_but_healthz_and_the_static_page(pipe: EditPipeline) -> None:
    with client_for(pipe, api_key="s3cret") as client:
        for path in ("/v1/models", "/metrics"):
            missing = client.get(path)
            assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
            assert missing.json()["error"]["param"] == "Authorization"
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert _post(client, files(png(8, 8))).status_code == 401
        assert client.post("/v1/plan", files=files(png(8, 8))).status_code == 401
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200


# --- the other routes ---------------------------------------------------------------------------------


def test_plan_route_returns_the_uniref_plan_json_object(
    pipe: EditPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helpers import run_cli

    refs = {"wide.png": png(60, 20, 1), "tall.png": png(20, 50, 2)}
    for name, data in refs.items():
        (tmp_path / name).write_bytes(data)
    with client_for(pipe) as client:
        served = client.post("/v1/plan", files=[("image", (n, d, "image/png")) for n, d in refs.items()], data={})
        per_image = client.post("/v1/plan", files=files(png(60, 20)), data={"mode": "per_image", "budget": "32"})
    spec = pipe.model.spec
    args = ["plan", "--json", "--budget", "64", "--multiple", str(spec.plan_multiple)]
    code, out, _ = run_cli(
        [*args, "--token-pixels", str(spec.token_pixels), *(str(tmp_path / n) for n in refs)], capsys
    )
    assert code == 0 and served.status_code == 200
    expected = json.loads(out)
    for item in expected["images"]:
        item["path"] = Path(item["path"]).name
    assert served.json() == expected
    assert per_image.json()["mode"] == "per_image" and per_image.json()["budget_pixels"] == 32 * 32


def test_models_healthz_and_metrics_describe_the_server(pipe: EditPipeline) -> None:
    with client_for(pipe, max_batch=4) as client:
        assert _post(client, files(png(8, 8)), attention="true").status_code == 200
        models = client.get("/v1/models").json()
        health = client.get("/healthz").json()
        metrics = client.get("/metrics")
        edit = _post(client, files(png(8, 8), png(12, 8)), attention="true").json()
    info = models["data"][0]
    assert info["id"] == "tiny-random" and info["object"] == "model"
    assert info["uniref"]["max_batch"] == 4 and info["uniref"]["token_pixels"] == pipe.model.spec.token_pixels
    assert health == {"status": "ok", "model": "tiny-random", "queue_depth": 0}
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        'uniref_requests_total{route="/v1/images/edits",status="200"} 1.0',
        "uniref_queue_depth 0.0",
        "uniref_batch_size_bucket",
        "uniref_request_seconds_bucket",
        "uniref_batch_tokens_sum",
    ):
        assert name in metrics.text
    attention = edit["uniref"]["attention"][0]  # the tiny model records attention: per reference shares
    assert [r["picture"] for r in attention["references"]] == [1, 2]
    assert abs(sum(r["share"] for r in attention["references"]) - 1) < 1e-6
    assert attention["summary"].startswith("picture 1 got")


def test_page_and_its_assets_come_from_the_package(pipe: EditPipeline) -> None:
    with client_for(pipe) as client:
        page = client.get("/")
        assets = [client.get(f"/static/{name}") for name in ("app.js", "style.css")]
    assert page.status_code == 200 and "static/app.js" in page.text
    assert all(a.status_code == 200 and len(a.content) > 500 for a in assets)
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: nothing is fetched from elsewhere


def test_qwen_image_edit_folder_is_served(tmp_path: Path) -> None:
    import qwen_tiny  # tests/qwen_tiny.py: tiny random Qwen-Image-Edit components, offline

    folder = qwen_tiny.save_folder(qwen_tiny.build_components(), tmp_path / "qwen-tiny")
    pipe = EditPipeline.from_pretrained(folder)
    app = create_app(pipe, ServeConfig(model_name=folder.name))
    with TestClient(app) as client:
        response = client.post(
            "/v1/images/edits",
            files=files(png(64, 32, 1), png(32, 64, 2)),
            data={"prompt": PROMPT, "steps": "2", "budget": "64", "size": "64x64", "seed": "5"},
        )
        model = client.get("/v1/models").json()["data"][0]
    assert response.status_code == 200, response.text
    body = response.json()
    assert decode(body["data"][0]["b64_json"]).shape == (64, 64, 3)
    assert body["uniref"]["plan"]["budget_pixels"] == 64 * 64  # "64" means 64², as `uniref edit --budget 64`
    assert body["uniref"]["plan"]["total_tokens"] <= body["uniref"]["plan"]["token_cap"]
    assert "attention" not in body["uniref"]
    assert model["id"] == "qwen-tiny" and model["uniref"]["token_pixels"] == pipe.model.spec.token_pixels


# --- the command ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_request_in_flight_then_exits_0() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "uniref", "serve", "--model", "tiny-random", "--port", str(port)]
    cmd += ["--max-wait-ms", "800"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        result: dict[str, httpx.Response] = {}
        sender = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(url + "/v1/images/edits", files=files(png(8, 8)), data={"prompt": PROMPT, "steps": "2"})
            )
        )
        sender.start()
        time.sleep(0.3)  # the request is now waiting in the batcher (max wait 800 ms)
        proc.send_signal(signal.SIGTERM)
        sender.join(30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert result["r"].status_code == 200 and len(result["r"].json()["data"]) == 1
    assert code == 0, stderr
    assert "Traceback" not in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=1)
