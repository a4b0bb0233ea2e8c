"""Hand-computed checks of the pure REINFORCE/RLOO loss helpers in rl_client.losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rl_client.losses import (
    kl_k1,
    masked_mean,
    masked_sum,
    policy_gradient_loss,
    reinforce_advantages,
    rloo_advantages,
    shaped_returns,
    token_entropy,
    token_logprobs,
)

NAN = float("nan")


def test_token_logprobs_uniform_logits_give_log_quarter() -> None:
    logits = torch.zeros(2, 3, 4)  # uniform over V=4
    tokens = torch.tensor([[0, 1, 2], [3, 3, 0]])
    assert_close(token_logprobs(logits, tokens), torch.full((2, 3), math.log(0.25)))


def test_token_logprobs_picks_the_given_token_in_float32() -> None:
    # logits [0, log 3] -> probabilities [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]]).bfloat16()
    tokens = torch.tensor([[0, 1]])
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    # bf16 rounds log 3, so compare at bf16 input precision
    assert_close(out, torch.tensor([[math.log(0.25), math.log(0.75)]]), atol=1e-2, rtol=0)


def test_token_logprobs_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="tokens must match"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_token_entropy_hand_values() -> None:
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],  # uniform over 4: log 4
                [0.0, 0.0, -math.inf, -math.inf],  # uniform over 2: log 2, no NaN
                [0.0, math.log(3.0), -math.inf, -math.inf],  # p = [1/4, 3/4]
            ]
        ]
    )
    expected_last = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = torch.tensor([[math.log(4.0), math.log(2.0), expected_last]])
    assert_close(token_entropy(logits), expected)


def test_token_entropy_gradient_is_finite_with_masked_vocab() -> None:
    logits = torch.tensor([[[0.0, 1.0, -math.inf]]], requires_grad=True)
    token_entropy(logits).sum().backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_masked_sum_ignores_masked_out_values_including_nan() -> None:
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert_close(masked_sum(x, mask), torch.tensor([3.0, 6.0]))


def test_masked_sum_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"x and mask must have the same shape"):
        masked_sum(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


def test_masked_mean_hand_value_and_empty_mask() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    assert_close(masked_mean(x, mask), torch.tensor(3.0))  # (1 + 2 + 6) / 3
    empty = masked_mean(x, torch.zeros(2, 3, dtype=torch.bool))
    assert_close(empty, torch.tensor(0.0))


def test_kl_k1_sums_masked_log_ratio() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref_logp = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -2.0, -0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: 0.5 + (-1.0) = -0.5 (third token masked); row 1: 0.5 + 1.5 + 0 = 2.0
    assert_close(kl_k1(logp, ref_logp, mask), torch.tensor([-0.5, 2.0]))


def test_kl_k1_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="logp and ref_logp"):
        kl_k1(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_shaped_returns_subtracts_alpha_kl() -> None:
    rewards = torch.tensor([1.0, 2.0])
    kl = torch.tensor([0.5, -1.0])
    assert_close(shaped_returns(rewards, kl, alpha=0.1), torch.tensor([0.95, 2.1]))


def test_rloo_single_group_of_three() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2
    assert_close(rloo_advantages(returns, valid), torch.tensor([[-1.5, 0.0, 1.5]]))


def test_rloo_group_of_four() -> None:
    returns = torch.tensor([[1.0, 2.0, 4.0, 7.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    # 1 - 13/3, 2 - 12/3, 4 - 10/3, 7 - 7/3
    expected = torch.tensor([[1 - 13 / 3, 2 - 4.0, 4 - 10 / 3, 7 - 7 / 3]])
    assert_close(rloo_advantages(returns, valid), expected)


def test_rloo_invalid_entries_are_excluded_and_nan_does_not_leak() -> None:
    returns = torch.tensor(
        [
            [1.0, 3.0, NAN],  # two valid: 1 - 3, 3 - 1, invalid -> 0
            [5.0, NAN, NAN],  # one valid: whole group 0
            [NAN, NAN, NAN],  # none valid: whole group 0
            [2.0, 4.0, 9.0],  # all valid: 2 - 6.5, 4 - 5.5, 9 - 3
        ]
    )
    valid = torch.tensor(
        [
            [True, True, False],
            [True, False, False],
            [False, False, False],
            [True, True, True],
        ]
    )
    expected = torch.tensor(
        [
            [-2.0, 2.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [-4.5, -1.5, 6.0],
        ]
    )
    assert_close(rloo_advantages(returns, valid), expected)


def test_rloo_shape_mismatch_and_non_bool_valid_raise() -> None:
    with pytest.raises(ValueError, match=r"returns and valid must have the same shape"):
        rloo_advantages(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        rloo_advantages(torch.zeros(2, 3), torch.ones(2, 3))


def test_reinforce_advantages_are_returns_where_valid() -> None:
    returns = torch.tensor([[1.0, NAN], [3.0, 4.0]])
    valid = torch.tensor([[True, False], [True, True]])
    assert_close(reinforce_advantages(returns, valid), torch.tensor([[1.0, 0.0], [3.0, 4.0]]))


def test_reinforce_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="returns and valid"):
        reinforce_advantages(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_policy_gradient_loss_value_and_gradient() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0], [-1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    advantages = torch.tensor([2.0, -1.0, NAN], requires_grad=True)  # row 2 invalid, NaN
    valid = torch.tensor([True, True, False])
    # masked sums: [-3, -0.5, -2]; loss = -(2 * -3 + -1 * -0.5) / 2 = 2.75
    loss = policy_gradient_loss(logp, mask, advantages, valid)
    assert_close(loss, torch.tensor(2.75))
    loss.backward()
    # d loss / d logp = -A_i * mask / n_valid, zero for the invalid row
    expected_grad = torch.tensor([[-1.0, -1.0], [0.5, 0.0], [0.0, 0.0]])
    assert logp.grad is not None
    assert_close(logp.grad, expected_grad)
    assert advantages.grad is None  # advantages are detached inside


def test_policy_gradient_loss_with_no_valid_sequence_is_zero() -> None:
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = policy_gradient_loss(logp, torch.ones(1, 2), torch.tensor([3.0]), torch.tensor([False]))
    assert_close(loss, torch.tensor(0.0))
    loss.backward()
    assert logp.grad is not None
    assert_close(logp.grad, torch.zeros(1, 2))


def test_policy_gradient_loss_shape_mismatches_raise() -> None:
    logp = torch.zeros(2, 3)
    valid2 = torch.ones(2, dtype=torch.bool)
    valid3 = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="logp and mask"):
        policy_gradient_loss(logp, torch.ones(2, 4), torch.zeros(2), valid2)
    with pytest.raises(ValueError, match="advantages and valid"):
        policy_gradient_loss(logp, torch.ones(2, 3), torch.zeros(2), valid3)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_gradient_loss(logp, torch.ones(2, 3), torch.zeros(3), valid3)
