"""Which members go into the weight average: all of them, the best k, or a greedy soup.

The greedy soup (Wortsman et al. 2022, "Model soups") takes the members in order of their
own held-out accuracy (best first; ties by name) and adds each to the average only if the
average's held-out score gets strictly better: a member that would make the average worse
is left out, and a tie keeps the smaller soup. The outcome does not depend on the order the
members are given in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Select = Literal["all", "top-k", "greedy"]
SelectMetric = Literal["accuracy", "log-loss"]


class Tried(BaseModel):
    """One candidate average the greedy soup scored."""

    model_config = ConfigDict(frozen=True)

    members: list[str] = Field(description="Member names, sorted.")
    score: float = Field(description="Held-out accuracy or log-loss of their uniform average.")
    kept: bool = Field(description="Whether the soup went on with it.")


def greedy_soup(
    names: Sequence[str],
    accuracies: Sequence[float],
    evaluate: Callable[[list[str]], float],
    *,
    higher_is_better: bool = True,
) -> tuple[list[str], list[Tried]]:
    """(the soup's members, every candidate tried, in order). `evaluate` scores the uniform
    average of the members it is given (sorted by name); `higher_is_better`: accuracy (True)
    or a loss (False)."""
    if not names or len(names) != len(accuracies):
        raise ValueError("one held-out accuracy per member, at least one member")
    order = sorted(range(len(names)), key=lambda i: (-accuracies[i], names[i]))
    soup = [names[order[0]]]
    best = evaluate(sorted(soup))
    tried = [Tried(members=sorted(soup), score=best, kept=True)]
    for i in order[1:]:
        candidate = sorted([*soup, names[i]])
        score = evaluate(candidate)
        better = score > best if higher_is_better else score < best
        tried.append(Tried(members=candidate, score=score, kept=better))
        if better:
            soup, best = candidate, score
    return sorted(soup), tried


def laggards(accuracies: Mapping[str, float], pairs: int) -> list[str]:
    """Members whose held-out accuracy (on `pairs` pairs) is more than two standard errors
    below the best member's, the two accuracies' binomial standard errors combined: likely
    under-trained, or stuck on a shortcut the others did not take. In the given order."""
    best = max(accuracies.values())

    def variance(p: float) -> float:
        return p * (1 - p) / pairs

    return [
        name
        for name, accuracy in accuracies.items()
        if best - accuracy > 2 * math.sqrt(variance(best) + variance(accuracy))
    ]
