"""Reward sources: in-process scene metrics, the HTTP reward server round trip, and the VLM judge client against a
local fake judge (FastAPI on 127.0.0.1, ephemeral port). No traffic leaves 127.0.0.1; every retry loop is bounded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image, ImageFilter

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from uniref.data.sample import Sample  # noqa: E402
from uniref.data.tasks import TaskConfig, generate  # noqa: E402
from uniref.rewards import RewardSource, SceneRewards  # noqa: E402
from uniref.rewards.judge import JudgeConfig, VLMJudge, parse_judge_scores  # noqa: E402
from uniref.rewards.remote import HTTPRewardSource  # noqa: E402
from uniref.rewards.server import BackgroundServer, create_app  # noqa: E402
from uniref.rewards.sources import MergedRewards, RetryPolicy, ScoreDict  # noqa: E402

COMPOSE = TaskConfig(tasks=("compose",), max_refs=3)
FAST_RETRY = RetryPolicy(max_retries=2, backoff=0.0, timeout=5.0)  # 3 attempts at most, no waiting
API_KEY_ENV = "UNIREF_TEST_JUDGE_KEY"


def _samples_and_outputs() -> tuple[list[Sample], list[Image.Image]]:
    """Two samples, each with its target, a blurred target and a blank output (a GRPO group of 3 each)."""
    samples, outputs = [], []
    for seed in (0, 1):
        s = generate(seed, COMPOSE)
        blank = Image.new("RGB", s.target.size, (128, 128, 128))
        for out in (s.target, s.target.filter(ImageFilter.GaussianBlur(2)), blank):
            samples.append(s)
            outputs.append(out)
    return samples, outputs


# --- in-process and HTTP reward server ------------------------------------------------------------------------------


def test_scene_rewards_name_every_reference_and_score_ground_truth_perfect():
    samples, outputs = _samples_and_outputs()
    scores = SceneRewards().score(samples, outputs)
    assert isinstance(SceneRewards(), RewardSource)
    for sample, s in zip(samples, scores, strict=True):
        assert s is not None and set(s) == {*(f"ref_{k + 1}" for k in range(sample.k)), "instruction", "quality"}
    assert min(scores[0].values()) > 0.999 and scores[2]["ref_1"] < scores[0]["ref_1"]


def test_http_reward_server_round_trip_equals_the_in_process_source():
    samples, outputs = _samples_and_outputs()
    expected = SceneRewards().score(samples, outputs)
    with BackgroundServer(create_app(SceneRewards())) as server:
        remote = HTTPRewardSource(server.url, batch_size=4, retry=FAST_RETRY)  # 6 items → batches of 4 and 2
        assert remote.score(samples, outputs) == expected
        remote.close()
    assert remote.stats.as_dict() == {"requests": 2, "retries": 0, "scored": 6, "failed": 0}


class _Flaky:
    """A source whose first ``failures`` calls raise (the server answers 500), then scores like SceneRewards."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def score(self, samples: list[Sample], outputs: list[Image.Image]) -> list[ScoreDict | None]:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("reward model out of memory")
        return SceneRewards().score(samples, outputs)


def test_http_reward_client_retries_server_errors_then_succeeds():
    samples, outputs = _samples_and_outputs()
    with BackgroundServer(create_app(_Flaky(failures=2))) as server:
        remote = HTTPRewardSource(server.url, retry=FAST_RETRY)
        scores = remote.score(samples, outputs)
        remote.close()
    assert scores == SceneRewards().score(samples, outputs)
    assert remote.stats.as_dict() == {"requests": 3, "retries": 2, "scored": 6, "failed": 0}


def test_http_reward_client_gives_none_not_zero_after_bounded_retries():
    samples, outputs = _samples_and_outputs()
    source = _Flaky(failures=100)
    with BackgroundServer(create_app(source)) as server:
        remote = HTTPRewardSource(server.url, retry=FAST_RETRY)
        scores = remote.score(samples, outputs)
        remote.close()
    assert scores == [None] * 6
    assert source.calls == 1 + FAST_RETRY.max_retries
    assert remote.stats.failed == 6 and remote.stats.scored == 0


def test_http_reward_client_with_no_server_fails_every_sample_as_none():
    with socket.socket() as sock:  # a port on 127.0.0.1 that nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    samples, outputs = _samples_and_outputs()
    remote = HTTPRewardSource(f"http://127.0.0.1:{port}", retry=FAST_RETRY)
    assert remote.score(samples[:2], outputs[:2]) == [None, None]
    assert remote.stats.requests == 1 + FAST_RETRY.max_retries and remote.stats.failed == 2


def test_http_reward_server_rejects_unscorable_samples_without_retries():
    s = generate(0, COMPOSE)
    no_spec = Sample(instruction=s.instruction, refs=s.refs, target=s.target, task=s.task, spec={})
    with BackgroundServer(create_app(SceneRewards())) as server:
        remote = HTTPRewardSource(server.url, retry=FAST_RETRY)
        assert remote.score([no_spec], [s.target]) == [None]
        remote.close()
    assert remote.stats.requests == 1 and remote.stats.retries == 0 and remote.stats.failed == 1


def test_merged_rewards_prefix_names_and_fail_a_sample_if_any_source_fails():
    class FailsSecond:
        def score(self, samples, outputs):
            return [{"x": 0.5}, None] + [{"x": 0.5}] * (len(samples) - 2)

    samples, outputs = _samples_and_outputs()
    merged = MergedRewards({"": SceneRewards(), "judge/": FailsSecond()}).score(samples[:3], outputs[:3])
    assert merged[1] is None and merged[0]["judge/x"] == 0.5 and merged[0]["ref_1"] > 0.999


# --- VLM judge: parsing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "expected"),
    [
        ('{"score": 7, "reason": "ok"}', 1, [7.0]),
        ('Here you go:\n```json\n{"score": 8.5}\n```', 1, [8.5]),
        ('<think>maybe {"score": 2}</think>{"score": 9}', 1, [9.0]),
        ('{"score": "7/10"}', 1, [7.0]),
        ('{"Scores": [8, 6, "9"]}', 3, [8.0, 6.0, 9.0]),
        ('{"scores": {"picture 2": 6, "picture 1": 8}}', 2, [8.0, 6.0]),
        ("Score: 7", 1, [7.0]),
        ("I would give it **6/10** overall.", 1, [6.0]),
        ("4", 1, [4.0]),
        ("Picture 1: 8\nPicture 2 - 6.5", 2, [8.0, 6.5]),
        ("scores: [3, 10]", 2, [3.0, 10.0]),
        ("0", 1, [0.0]),
    ],
)
def test_judge_parses_json_then_regex_variants(text, count, expected):
    assert parse_judge_scores(text, count) == expected


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ('{"score": 11}', 1),  # out of range
        ('{"score": -1}', 1),
        ("Score: 12", 1),
        ('{"score": true}', 1),
        ('{"score": "great"}', 1),
        ('{"score": NaN}', 1),
        ('{"scores": [8, 7]}', 3),  # wrong count
        ("Picture 1: 8\nPicture 3: 6", 3),  # picture 2 missing
        ("The image looks fine.", 1),  # no score at all
        ("", 1),
        ('{"score": 15} but really Score: 7', 1),  # an invalid JSON verdict is not rescued by the regex
    ],
)
def test_judge_answer_without_valid_scores_is_a_failure_not_zero(text, count):
    assert parse_judge_scores(text, count) is None


# --- VLM judge: against a fake OpenAI-compatible server -------------------------------------------------------------

TASK_AXIS = {
    "multi-source integration": "integration",
    "per-reference feature consistency": "consistency",
    "visual quality": "quality",
}
Handler = Callable[[str, int, dict[str, Any]], tuple[int, str]]


class FakeJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` that answers from ``handler(axis, k, body)``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []  # (axis, body, headers)
        self.handler: Handler = self.default
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def complete(request: Request) -> JSONResponse:
            body = await request.json()
            texts = [p["text"] for p in body["messages"][1]["content"] if p["type"] == "text"]
            axis = TASK_AXIS[texts[-1].split("\n")[0].removeprefix("Task: ").rstrip(".")]
            k = sum(t.startswith("Picture ") for t in texts)
            with self.lock:
                self.requests.append((axis, body, dict(request.headers)))
            status, content = await run_in_threadpool(self.handler, axis, k, body)  # a slow handler blocks no one
            if status != 200:
                return JSONResponse({"error": content}, status_code=status)
            return JSONResponse({"choices": [{"message": {"role": "assistant", "content": content}}]})

    @staticmethod
    def default(axis: str, k: int, body: dict[str, Any]) -> tuple[int, str]:
        if axis == "integration":
            return 200, '{"score": 8, "reason": "all there"}'
        if axis == "consistency":
            scores = ", ".join(str(9 - i) for i in range(k))
            return 200, f'```json\n{{"scores": [{scores}]}}\n```'
        return 200, "Visual quality: sharp. Score: 6/10"

    def count(self, axis: str) -> int:
        return sum(a == axis for a, _, _ in self.requests)


@pytest.fixture(scope="module")
def judge_server() -> Iterator[tuple[FakeJudge, str]]:
    fake = FakeJudge()
    with BackgroundServer(fake.app) as server:
        yield fake, server.url + "/v1"


@pytest.fixture
def fake_judge(judge_server) -> Iterator[tuple[FakeJudge, str]]:
    fake, url = judge_server
    fake.handler, fake.requests = fake.default, []
    yield fake, url


def _judge(url: str, **kw: Any) -> VLMJudge:
    return VLMJudge(JudgeConfig(base_url=url, model="fake-vl", api_key_env=API_KEY_ENV, retry=FAST_RETRY, **kw))


def test_judge_scores_three_axes_normalised_to_unit_interval(fake_judge, monkeypatch):
    fake, url = fake_judge
    monkeypatch.setenv(API_KEY_ENV, "sk-test")
    samples, outputs = _samples_and_outputs()
    judge = _judge(url)
    scores = judge.score(samples[:2], outputs[:2])
    judge.close()
    k = samples[0].k
    expected = {"instruction": 0.8, "quality": 0.6, **{f"ref_{i + 1}": (9 - i) / 10 for i in range(k)}}
    assert scores == [expected, expected]
    assert len(fake.requests) == 2 * 3 and judge.stats.as_dict() == {
        "requests": 6,
        "retries": 0,
        "scored": 2,
        "failed": 0,
    }
    for axis, body, headers in fake.requests:
        images = [p for p in body["messages"][1]["content"] if p["type"] == "image_url"]
        assert len(images) == (1 if axis == "quality" else k + 1) and body["model"] == "fake-vl"
        assert images[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert headers["authorization"] == "Bearer sk-test"


def test_judge_sends_no_key_when_its_environment_variable_is_unset(fake_judge, monkeypatch):
    fake, url = fake_judge
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    samples, outputs = _samples_and_outputs()
    assert _judge(url, axes=("quality",)).score(samples[:1], outputs[:1]) == [{"quality": 0.6}]
    assert "authorization" not in fake.requests[0][2]


def test_judge_retries_server_errors_and_unparsable_answers_then_succeeds(fake_judge):
    fake, url = fake_judge
    answers = iter([(503, "loading"), (200, "I cannot rate this.")])

    def flaky(axis, k, body):
        return next(answers, (200, '{"score": 5}')) if axis == "quality" else fake.default(axis, k, body)

    fake.handler = flaky
    samples, outputs = _samples_and_outputs()
    judge = _judge(url)
    (scores,) = judge.score(samples[:1], outputs[:1])
    assert scores is not None and scores["quality"] == 0.5
    assert fake.count("quality") == 3 and judge.stats.retries == 2 and judge.stats.failed == 0


@pytest.mark.parametrize("reply", [(500, "boom"), (200, '{"score": 42}'), (200, "no idea")])
def test_judge_failure_after_bounded_retries_is_none_and_counted(fake_judge, reply):
    fake, url = fake_judge
    fake.handler = lambda axis, k, body: reply if axis == "consistency" else fake.default(axis, k, body)
    samples, outputs = _samples_and_outputs()
    judge = _judge(url)
    scores = judge.score(samples[:2], outputs[:2])
    assert scores == [None, None]  # never a 0 for what nobody judged
    assert fake.count("consistency") == 2 * (1 + FAST_RETRY.max_retries)
    assert judge.stats.failed == 2 and judge.stats.scored == 0


def test_judge_timeout_is_a_failure_not_a_hang(fake_judge):
    fake, url = fake_judge

    def slow(axis, k, body):
        time.sleep(0.5)
        return fake.default(axis, k, body)

    fake.handler = slow
    samples, outputs = _samples_and_outputs()
    judge = VLMJudge(
        JudgeConfig(base_url=url, axes=("quality",), retry=RetryPolicy(max_retries=1, backoff=0.0, timeout=0.1))
    )
    start = time.monotonic()
    assert judge.score(samples[:1], outputs[:1]) == [None]
    assert time.monotonic() - start < 2.0 and judge.stats.requests == 2


def test_judge_fails_only_the_samples_whose_calls_failed(fake_judge):
    fake, url = fake_judge
    samples, outputs = _samples_and_outputs()
    bad_instruction = samples[3].instruction  # the second sample's group

    def picky(axis, k, body):
        prompt = body["messages"][1]["content"][-1]["text"]
        return (500, "down") if bad_instruction in prompt else fake.default(axis, k, body)

    fake.handler = picky
    scores = _judge(url, axes=("integration",)).score([samples[0], samples[3]], [outputs[0], outputs[3]])
    assert scores == [{"instruction": 0.8}, None]


def test_overall_reward_is_the_headline_score_and_pays_nothing_for_copying_picture_one():
    from uniref.data import TaskConfig, parse_tasks
    from uniref.data.splits import split_samples
    from uniref.rewards.metrics import Scorer
    from uniref.rewards.sources import with_overall

    samples = split_samples("val", 6, TaskConfig(parse_tasks("compose"), 3))
    scores = SceneRewards().score(samples, [s.refs[0] for s in samples])
    copied = [with_overall(x) for x in scores]
    expected = [Scorer(s)(s.refs[0]).overall for s in samples]
    assert [c["overall"] for c in copied] == pytest.approx(expected)
    truth = with_overall(SceneRewards().score(samples[:1], [samples[0].target])[0])
    assert truth["overall"] == pytest.approx(1.0)
    assert with_overall(None) is None and with_overall({"quality": 0.5}) == {"quality": 0.5}
