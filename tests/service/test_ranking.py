"""Best-of-N ranking, against hand-computed expectations."""

from __future__ import annotations

import math

import pytest

from service.ranking import rank

# --- ranking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards", "order", "mean", "std", "advantages"),
    [
        # mean 2; sum sq dev 1+1+0 = 2; std sqrt(2/2) = 1; adv = r - 2.
        ([1.0, 3.0, 2.0], [1, 2, 0], 2.0, 1.0, [-1.0, 1.0, 0.0]),
        # mean 3.5; sum sq 4 * 1.5^2 = 9; std sqrt(9/3) = sqrt 3; adv +-1.5/sqrt 3 = +-sqrt(3/4).
        ([2, 5, 2, 5], [1, 3, 0, 2], 3.5, math.sqrt(3), [-math.sqrt(0.75), math.sqrt(0.75)] * 2),
        # mean 2; sum sq 4+4 = 8; std sqrt(8/1) = 2.828; adv +-2/2.828 = +-sqrt(1/2).
        ([0.0, 4.0], [1, 0], 2.0, math.sqrt(8), [-math.sqrt(0.5), math.sqrt(0.5)]),
        # mean -2; sum sq 1+1 = 2; std sqrt 2; adv +-1/sqrt 2 = +-sqrt(1/2).
        ([-1.0, -3.0], [0, 1], -2.0, math.sqrt(2), [math.sqrt(0.5), -math.sqrt(0.5)]),
        # One candidate: std 0, advantage 0.
        ([3.5], [0], 3.5, 0.0, [0.0]),
        # All equal: std 0, advantages 0, order = request order.
        ([2.0, 2.0, 2.0], [0, 1, 2], 2.0, 0.0, [0.0, 0.0, 0.0]),
    ],
)
def test_rank(
    rewards: list[float], order: list[int], mean: float, std: float, advantages: list[float]
) -> None:
    ranking = rank(rewards)
    assert ranking.order == order
    assert ranking.mean == pytest.approx(mean)
    assert ranking.std == pytest.approx(std)
    assert ranking.advantages == pytest.approx(advantages)


def test_rank_empty() -> None:
    with pytest.raises(ValueError, match="at least one"):
        rank([])
