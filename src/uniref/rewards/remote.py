"""Client of the HTTP reward protocol (:mod:`uniref.rewards.protocol`): a remote source as a local one.

    source = HTTPRewardSource("http://127.0.0.1:8900", batch_size=32, retry=RetryPolicy(timeout=30))
    scores = source.score(samples, outputs)      # None where the server failed; source.stats counts it

Each batch is one request, retried on timeouts, connection errors, 5xx/408/429 and malformed responses, with
exponential backoff; after the last retry every item of the batch is None (never 0). A 4xx is our request's
fault and is not retried.
"""

from __future__ import annotations

from typing import Any

import httpx
from PIL import Image

from uniref.data.sample import Sample
from uniref.rewards.protocol import SCORE_PATH, encode_request, parse_scores
from uniref.rewards.sources import (
    FatalCallError,
    RetryableError,
    RetryPolicy,
    RewardStats,
    ScoreDict,
    call_with_retries,
    check_lengths,
)

DEFAULT_BATCH_SIZE = 32  # items per request: one GRPO group of up to 32 outputs, tens of MB of PNG at most
RETRYABLE_STATUS = frozenset({408, 429})  # timeouts and rate limits pass on a later try; so does any 5xx


def post_json(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """POST ``body`` and return the parsed JSON, mapping failures to Retryable/FatalCallError."""
    try:
        response = client.post(url, json=body, headers=headers)
    except httpx.TransportError as e:  # connect/read timeouts, refused connections, protocol errors
        raise RetryableError(f"{type(e).__name__}: {e}") from e
    if response.status_code >= 500 or response.status_code in RETRYABLE_STATUS:
        raise RetryableError(f"HTTP {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        raise FatalCallError(f"HTTP {response.status_code}: {response.text[:500]}")
    try:
        return response.json()
    except ValueError as e:
        raise RetryableError(f"response is not JSON: {response.text[:200]!r}") from e


class HTTPRewardSource:
    """A reward source served elsewhere (e.g. by :func:`uniref.rewards.server.serve`), used like a local one."""

    def __init__(
        self,
        base_url: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        retry: RetryPolicy | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: need at least 1")
        self.url = base_url.rstrip("/") + SCORE_PATH
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self.client = client or httpx.Client(timeout=self.retry.timeout)
        self.stats = RewardStats()

    def score(self, samples: list[Sample], outputs: list[Image.Image]) -> list[ScoreDict | None]:
        check_lengths(samples, outputs)
        results: list[ScoreDict | None] = []
        for start in range(0, len(samples), self.batch_size):
            batch_samples = samples[start : start + self.batch_size]
            body = encode_request(batch_samples, outputs[start : start + self.batch_size])
            n = len(batch_samples)

            def call(body: dict[str, Any] = body, n: int = n) -> list[ScoreDict | None]:
                try:
                    return parse_scores(post_json(self.client, self.url, body), n)
                except ValueError as e:  # a malformed response: a restarted or overloaded server may do better
                    raise RetryableError(str(e)) from e

            scores = call_with_retries(call, self.retry, self.stats, f"reward request to {self.url}")
            scores = scores if scores is not None else [None] * n
            failed = sum(s is None for s in scores)
            self.stats.add(scored=n - failed, failed=failed)
            results.extend(scores)
        return results

    def close(self) -> None:
        self.client.close()
