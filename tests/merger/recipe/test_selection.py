"""The greedy soup on hand-made members whose averages' scores are known."""

from __future__ import annotations

import itertools

import pytest

from merger.recipe.selection import greedy_soup, laggards

# Held-out accuracy of each member alone, and of the averages the soup may try.
ALONE = {"a": 0.80, "b": 0.75, "c": 0.70, "d": 0.60}
AVERAGES = {
    ("a",): 0.80,
    ("a", "b"): 0.84,  # b helps
    ("a", "b", "c"): 0.81,  # c hurts: left out
    ("a", "b", "d"): 0.84,  # d ties: the smaller soup is kept
}


def evaluate(names: list[str]) -> float:
    return AVERAGES[tuple(names)]


def test_a_member_that_lowers_the_soup_is_left_out_and_a_tie_keeps_it_smaller() -> None:
    soup, tried = greedy_soup(list(ALONE), list(ALONE.values()), evaluate)
    assert soup == ["a", "b"]
    assert [(t.members, t.score, t.kept) for t in tried] == [
        (["a"], 0.80, True),
        (["a", "b"], 0.84, True),
        (["a", "b", "c"], 0.81, False),
        (["a", "b", "d"], 0.84, False),
    ]


def test_the_soup_does_not_depend_on_the_order_of_the_members() -> None:
    want = greedy_soup(list(ALONE), list(ALONE.values()), evaluate)
    for order in itertools.permutations(ALONE):
        assert greedy_soup(list(order), [ALONE[n] for n in order], evaluate) == want


def test_with_a_loss_lower_is_better() -> None:
    losses = {("a",): 0.5, ("a", "b"): 0.6, ("a", "c"): 0.4}
    soup, tried = greedy_soup(
        ["c", "b", "a"], [0.7, 0.75, 0.8], lambda n: losses[tuple(n)], higher_is_better=False
    )
    assert soup == ["a", "c"] and [t.kept for t in tried] == [True, False, True]


def test_members_and_accuracies_go_together() -> None:
    with pytest.raises(ValueError, match="one held-out accuracy per member"):
        greedy_soup(["a"], [0.5, 0.6], evaluate)
    with pytest.raises(ValueError, match="at least one member"):
        greedy_soup([], [], evaluate)


def test_members_far_below_the_best_are_named() -> None:
    # 100 pairs: b is 0.05 below a (2 standard errors: 0.093), c is 0.4 below (0.117).
    assert laggards({"a": 0.9, "b": 0.85, "c": 0.5}, 100) == ["c"]
    assert laggards({"a": 0.9, "b": 0.85, "c": 0.5}, 10) == ["c"]  # 0.4 > 2 x 0.184
    assert laggards({"a": 0.7, "b": 0.7}, 50) == []
