"""Pure best-of-N arithmetic: ranks and GRPO-style group-normalised advantages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranking:
    """A group of rewards, ranked: `order[r]` is the index of the candidate at rank r."""

    order: list[int]
    advantages: list[float]  # by candidate index
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single candidate


def rank(rewards: Sequence[float]) -> Ranking:
    """Best first (ties keep request order); advantage = (r - mean) / std, 0 when std is 0."""
    n = len(rewards)
    if n == 0:
        raise ValueError("rank needs at least one reward")
    order = sorted(range(n), key=lambda i: (-rewards[i], i))
    mean = math.fsum(rewards) / n
    std = math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
    advantages = [(r - mean) / std if std > 0 else 0.0 for r in rewards]
    return Ranking(order=order, advantages=advantages, mean=mean, std=std)
