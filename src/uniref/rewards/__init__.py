"""Rewards and evaluation metrics: one module, so the RL signal and the benchmark score cannot drift apart."""

from uniref.rewards.metrics import ObjectScore, SampleScore, Scorer, score

__all__ = ["ObjectScore", "SampleScore", "Scorer", "score"]
