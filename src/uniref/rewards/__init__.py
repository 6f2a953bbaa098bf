"""Rewards and evaluation metrics: one module, so the RL signal and the benchmark score cannot drift apart.

Reward sources for MSGRPO (:mod:`uniref.rewards.sources`): :class:`RewardSource`, :class:`SceneRewards`,
:class:`MergedRewards`; the networked ones need the ``serve`` extra and are imported on first use:
``HTTPRewardSource`` (:mod:`~uniref.rewards.remote`), ``VLMJudge``/``JudgeConfig`` (:mod:`~uniref.rewards.judge`),
``create_app`` (:mod:`~uniref.rewards.server`).
"""

from __future__ import annotations

import importlib
from typing import Any

from uniref.rewards.metrics import ObjectScore, SampleScore, Scorer, score
from uniref.rewards.sources import MergedRewards, RetryPolicy, RewardSource, RewardStats, SceneRewards

# Imported lazily: they need httpx / fastapi (the ``serve`` extra), which `import uniref.rewards` must not.
_LAZY = {
    "HTTPRewardSource": "uniref.rewards.remote",
    "VLMJudge": "uniref.rewards.judge",
    "JudgeConfig": "uniref.rewards.judge",
    "create_app": "uniref.rewards.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uniref.rewards' has no attribute {name!r}")


__all__ = [
    "HTTPRewardSource",
    "JudgeConfig",
    "MergedRewards",
    "ObjectScore",
    "RetryPolicy",
    "RewardSource",
    "RewardStats",
    "SampleScore",
    "SceneRewards",
    "Scorer",
    "VLMJudge",
    "create_app",
    "score",
]
