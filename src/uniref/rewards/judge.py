"""An OpenAI-compatible VLM judge as a reward source (vLLM, SGLang serving Qwen2.5-VL, or a hosted model).

The paper's three axes, each its own chat-completions call per output, scored 0-10 and divided by 10:

* **multi-source integration** → ``instruction``: does the output do what the instruction asks, with the
  content of every reference combined into one coherent image;
* **per-reference feature consistency** → ``ref_1`` .. ``ref_K``: one score per reference, all in one call so
  the judge rates them on one scale (the reconciling aggregator compares them);
* **visual quality** → ``quality``: artifacts, blur, distortion, naturalness of the output alone.

Answers are parsed robustly (:func:`parse_judge_scores`): a JSON object first (``{"score": 7}`` /
``{"scores": [8, 6]}``, also inside code fences or after reasoning), then a regex fallback (``Score: 7``,
``7/10``, ``Picture 2: 6``). Missing, out-of-range or a wrong number of scores is a failed call — retried
with backoff like a timeout or a 5xx — and after the last retry the sample is None (counted in ``stats``),
never 0. The API key is read from the environment variable named by ``api_key_env`` (no header if unset:
local servers need none).
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from uniref.data.sample import Sample
from uniref.rewards.protocol import encode_image
from uniref.rewards.remote import post_json
from uniref.rewards.sources import (
    RetryableError,
    RetryPolicy,
    RewardStats,
    ScoreDict,
    call_with_retries,
    check_lengths,
    ref_key,
)

MAX_SCORE = 10.0  # the judge's scale is 0..MAX_SCORE (the paper's and OmniContext's 0-10)
INTEGRATION, CONSISTENCY, QUALITY = "integration", "consistency", "quality"
AXES = (INTEGRATION, CONSISTENCY, QUALITY)
AXIS_SOURCE = {INTEGRATION: "instruction", QUALITY: "quality"}  # consistency → ref_1..ref_K


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str = "http://127.0.0.1:8000/v1"  # OpenAI-compatible root (vLLM/SGLang default port 8000 + /v1)
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # the served model name
    api_key_env: str = "UNIREF_JUDGE_API_KEY"  # environment variable holding the key; unset → no auth header
    axes: tuple[str, ...] = AXES  # which of the three axes to ask for
    max_tokens: int = 512  # room for a short reason before/after the JSON
    temperature: float = 0.0  # deterministic judging: the reward should not be noisier than it must
    concurrency: int = 8  # calls in flight (vLLM batches concurrent requests)
    max_image_side: int | None = None  # downscale images whose long side exceeds this (judge token budget)
    retry: RetryPolicy = RetryPolicy(timeout=120.0)  # a VLM call with several images can take a while


SYSTEM_PROMPT = (
    "You are a strict, consistent evaluator of image editing and multi-image composition. You are shown "
    "reference pictures and one output image. Judge only what you are asked, on a 0 to 10 scale, and answer "
    "with a single JSON object."
)
INTEGRATION_PROMPT = (
    "Task: multi-source integration.\n"
    "The output was generated from the {k} reference picture(s) above for this instruction:\n"
    '"{instruction}"\n'
    "Rate from 0 to 10 how well the output follows the instruction and integrates the required content of "
    "every reference into one coherent image (0: ignores the instruction or leaves references out; 10: "
    "everything asked for is there and fits together).\n"
    'Answer with JSON only: {{"score": <0-10>, "reason": "<one sentence>"}}'
)
CONSISTENCY_PROMPT = (
    "Task: per-reference feature consistency.\n"
    "The output was generated from the {k} reference picture(s) above for this instruction:\n"
    '"{instruction}"\n'
    "For each reference picture, rate from 0 to 10 how faithfully the output preserves the features of what "
    "that picture contributes (identity, shape, colour, pattern, texture, proportions; 0: absent or "
    "replaced; 10: identical). Rate each picture on its own.\n"
    'Answer with JSON only: {{"scores": [<picture 1>, ..., <picture {k}>], "reason": "<one sentence>"}} '
    "with exactly {k} numbers in picture order."
)
QUALITY_PROMPT = (
    "Task: visual quality.\n"
    "Rate from 0 to 10 the visual quality of the output image alone: sharpness, absence of artifacts, "
    "distortions, seams and implausible blends (0: broken; 10: clean and natural). Ignore whether it matches "
    "any instruction.\n"
    'Answer with JSON only: {{"score": <0-10>, "reason": "<one sentence>"}}'
)

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)  # reasoning models' hidden thoughts
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE_STRING = re.compile(rf"^\s*{_NUMBER}\s*(?:/\s*10)?\s*$")  # "7", "7.5", "7/10"
_SINGLE_PATTERNS = (
    re.compile(rf"score\s*(?:is|of)?\s*[:=]?\s*\**\s*{_NUMBER}", re.IGNORECASE),  # Score: 7 / score = **7**
    re.compile(rf"{_NUMBER}\s*/\s*10\b"),  # 7/10
)
_PER_PICTURE = re.compile(rf"(?:picture|image|reference|ref)\s*#?\s*(\d+)\s*\**\s*[:=\-–]\s*\**\s*{_NUMBER}", re.I)
_LIST = re.compile(r"scores?\W{0,4}\[([^\]]*)\]", re.IGNORECASE)  # scores: [8, 7] outside a JSON object


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _SCORE_STRING.match(value)):
        return float(m.group(1))
    return None


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object embedded in ``text`` (fences, prose around it), in order."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def _from_json(obj: dict[str, Any], count: int) -> list[float | None] | None:
    """Scores from a JSON answer, or None if this object has no score key."""
    lowered = {str(k).lower(): v for k, v in obj.items()}
    if "scores" in lowered:
        v = lowered["scores"]
        if isinstance(v, dict):  # {"picture 1": 8, "picture 2": 6} / {"1": 8, "2": 6}
            keyed = {int(m.group()): s for k, s in v.items() if (m := re.search(r"\d+", str(k)))}
            return [_as_score(keyed.get(i + 1)) for i in range(count)] if len(keyed) == len(v) == count else [None]
        values = v if isinstance(v, list) else [v]
        return [_as_score(s) for s in values]
    if "score" in lowered:  # VIEScore and OmniContext answer {"score": [a, b]} for several scores
        v = lowered["score"]
        return [_as_score(s) for s in v] if isinstance(v, list) else [_as_score(v)]
    return None


def _from_text(text: str, count: int) -> list[float | None] | None:
    if count == 1:
        for pattern in _SINGLE_PATTERNS:
            if m := pattern.search(text):
                return [float(m.group(1))]
        if m := _SCORE_STRING.match(text):  # the whole answer is just a number
            return [float(m.group(1))]
        return None
    per_picture = {int(i): float(s) for i, s in _PER_PICTURE.findall(text)}
    if per_picture:
        return [per_picture.get(i + 1) for i in range(count)]
    if m := _LIST.search(text):
        return [_as_score(s) for s in m.group(1).split(",")]
    return None


def parse_judge_scores(text: str, count: int = 1, low: float = 0.0, high: float = MAX_SCORE) -> list[float] | None:
    """``count`` scores in [low, high] (default 0..10) from a judge's answer, or None if it does not give that.

    JSON first (the last object with a ``score``/``scores`` key decides, even if its values are invalid:
    a bad JSON verdict is not rescued by a number found elsewhere), then the regex fallback. Any score that
    is missing, non-numeric, outside [low, high] or not finite makes the whole answer a failure — never a 0.
    """
    text = _THINK.sub("", text)
    scores: list[float | None] | None = None
    for obj in reversed(_json_objects(text)):
        if (scores := _from_json(obj, count)) is not None:
            break
    if scores is None:
        scores = _from_text(text, count)
    if scores is None or len(scores) != count:
        return None
    if any(s is None or not math.isfinite(s) or not low <= s <= high for s in scores):
        return None
    return [float(s) for s in scores]  # type: ignore[arg-type]


def judge_reason(text: str) -> str:
    """The judge's stated reason: a ``reason``/``reasoning`` field of its JSON answer, else its text."""
    text = _THINK.sub("", text)
    for obj in reversed(_json_objects(text)):
        for key, value in obj.items():
            if str(key).lower() in ("reason", "reasoning", "explanation") and isinstance(value, str):
                return value.strip()
    return text.strip()


def image_part(img: Image.Image, max_side: int | None) -> dict[str, Any]:
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS
        )
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encode_image(img.convert("RGB"))}}


def judge_messages(axis: str, sample: Sample, output: Image.Image, max_side: int | None = None) -> list[dict[str, Any]]:
    """The chat messages for one axis: references as "Picture i:" (not for quality), then the output."""
    content: list[dict[str, Any]] = []
    if axis != QUALITY:
        for i, ref in enumerate(sample.refs):
            content += [{"type": "text", "text": f"Picture {i + 1}:"}, image_part(ref, max_side)]
    content += [{"type": "text", "text": "Output:"}, image_part(output, max_side)]
    prompt = {INTEGRATION: INTEGRATION_PROMPT, CONSISTENCY: CONSISTENCY_PROMPT, QUALITY: QUALITY_PROMPT}[axis]
    content.append({"type": "text", "text": prompt.format(k=sample.k, instruction=sample.instruction)})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def completion_text(body: Any) -> str:
    """``choices[0].message.content`` of a chat-completions response (string or list of text parts)."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise RetryableError(f"not a chat-completions response: {str(body)[:200]}") from e
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RetryableError(f"no text in the judge's answer: {str(body)[:200]}")
    return content


class VLMJudge:
    """A reward source asking an OpenAI-compatible VLM for the three axes (see the module doc)."""

    def __init__(self, config: JudgeConfig | None = None, *, client: httpx.Client | None = None) -> None:
        self.config = config or JudgeConfig()
        unknown = set(self.config.axes) - set(AXES)
        if unknown or not self.config.axes:
            raise ValueError(f"judge axes {self.config.axes}: choose from {AXES}")
        self.url = self.config.base_url.rstrip("/") + "/chat/completions"
        self.client = client or httpx.Client(timeout=self.config.retry.timeout)
        self.stats = RewardStats()

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.config.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def chat(
        self, messages: list[dict[str, Any]], count: int, what: str, low: float = 0.0, high: float = MAX_SCORE
    ) -> tuple[list[float] | None, str]:
        """``count`` scores in [low, high] from one chat-completions call (retried, see the module doc) and the
        judge's last answer text; scores None after the retries failed. The one client every judged score
        uses: the MSGRPO reward's axes here, the benchmarks' rubrics in :mod:`uniref.bench`."""
        body = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        last = [""]

        def call() -> list[float]:
            text = completion_text(post_json(self.client, self.url, body, self._headers()))
            last[0] = text
            scores = parse_judge_scores(text, count, low, high)
            if scores is None:  # a resample may follow the format; temperature 0 servers still vary across batches
                want = f"{count} scores in {low:g}-{high:g}"
                raise RetryableError(f"unparsable {what} answer (want {want}): {text[:200]!r}")
            return scores

        return call_with_retries(call, self.config.retry, self.stats, f"judge {what} call to {self.url}"), last[0]

    def ask(self, axis: str, sample: Sample, output: Image.Image) -> list[float] | None:
        """Raw 0-10 scores of one axis (K for consistency, else 1), or None after the retries failed."""
        count = sample.k if axis == CONSISTENCY else 1
        messages = judge_messages(axis, sample, output, self.config.max_image_side)
        return self.chat(messages, count, axis)[0]

    def _combine(self, answers: dict[str, list[float] | None]) -> ScoreDict | None:
        """One sample's source dict from its axes' raw scores; None if any axis failed."""
        if any(scores is None for scores in answers.values()):
            return None
        result: ScoreDict = {}
        for axis, scores in answers.items():
            assert scores is not None
            if axis == CONSISTENCY:
                result.update({ref_key(k): s / MAX_SCORE for k, s in enumerate(scores)})
            else:
                result[AXIS_SOURCE[axis]] = scores[0] / MAX_SCORE
        return result

    def score(self, samples: list[Sample], outputs: list[Image.Image]) -> list[ScoreDict | None]:
        check_lengths(samples, outputs)
        # Every (sample, axis) call goes to one pool: the server sees up to ``concurrency`` requests at once.
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = [
                {axis: pool.submit(self.ask, axis, sample, output) for axis in self.config.axes}
                for sample, output in zip(samples, outputs, strict=True)
            ]
            results = [self._combine({axis: f.result() for axis, f in calls.items()}) for calls in futures]
        failed = sum(r is None for r in results)
        self.stats.add(scored=len(results) - failed, failed=failed)
        return results

    def close(self) -> None:
        self.client.close()
