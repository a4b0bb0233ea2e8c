"""Pure policy-gradient losses for REINFORCE/RLOO with a k1 KL penalty folded into the reward."""

from __future__ import annotations

import torch


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_bool(name: str, t: torch.Tensor) -> None:
    # A float 0/1 "valid" usually means someone passed a mask or a reward by mistake.
    if t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {t.dtype}")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of `tokens`, where logits[:, t] predicts tokens[:, t]."""
    # logits: (N, T, V), tokens: (N, T) int -> (N, T) float32
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, T, V), got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens must match logits' (N, T), got {tuple(tokens.shape)} "
            f"and {tuple(logits.shape[:2])}"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (N, T)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (float32) of the softmax distribution at each position."""
    # logits: (N, T, V) -> (N, T)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, T, V), got shape {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    # Clamp -inf (masked vocabulary) so that 0 * log 0 is 0, not NaN, forward and backward.
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(dim=-1)  # (N, T)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum of `x` over positions where `mask` is true (masked-out values never leak)."""
    # x: (N, T), mask: (N, T) bool or 0/1 -> (N,)
    _check_same_shape("x", x, "mask", mask)
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum(dim=-1)  # (N,)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over all masked positions; 0.0 when the mask is empty."""
    # x: (N, T), mask: (N, T) -> scalar
    total = masked_sum(x, mask).sum()  # scalar
    count = mask.bool().sum().clamp(min=1)  # scalar; an empty mask gives 0 / 1 = 0
    return total / count


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence k1 KL estimate: sum over masked tokens of logp - ref_logp."""
    # logp, ref_logp, mask: (N, T) -> (N,)
    _check_same_shape("logp", logp, "ref_logp", ref_logp)
    return masked_sum(logp - ref_logp, mask)  # (N,)


def shaped_returns(rewards: torch.Tensor, kl: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL-penalised returns: rewards - alpha * kl."""
    # rewards, kl: (N,) -> (N,)
    _check_same_shape("rewards", rewards, "kl", kl)
    return rewards - alpha * kl


def rloo_advantages(returns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages per group; 0 for invalid samples and groups with < 2 valid."""
    # returns: (B, G) float, valid: (B, G) bool -> (B, G)
    _check_same_shape("returns", returns, "valid", valid)
    _check_bool("valid", valid)
    if returns.dim() != 2:
        raise ValueError(f"returns must be (B, G), got shape {tuple(returns.shape)}")
    r = torch.where(valid, returns, torch.zeros_like(returns))  # (B, G), NaN-free
    k = valid.sum(dim=1, keepdim=True)  # (B, 1) valid samples per group
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (k - 1).clamp(min=1)  # (B, G)
    use = valid & (k >= 2)  # (B, G)
    return torch.where(use, r - others_mean, torch.zeros_like(r))


def reinforce_advantages(returns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Plain REINFORCE advantages: the returns where valid, 0 elsewhere."""
    # returns: (B, G) float, valid: (B, G) bool -> (B, G)
    _check_same_shape("returns", returns, "valid", valid)
    _check_bool("valid", valid)
    return torch.where(valid, returns, torch.zeros_like(returns))


def policy_gradient_loss(
    logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """REINFORCE loss: -sum_i A_i * log pi(y_i) over valid sequences / max(n_valid, 1)."""
    # logp: (N, T) with grad, mask: (N, T), advantages: (N,), valid: (N,) bool -> scalar
    _check_same_shape("logp", logp, "mask", mask)
    _check_same_shape("advantages", advantages, "valid", valid)
    _check_bool("valid", valid)
    if advantages.dim() != 1 or advantages.shape[0] != logp.shape[0]:
        raise ValueError(
            f"advantages must be (N,) with N = logp's rows, got {tuple(advantages.shape)} "
            f"and logp {tuple(logp.shape)}"
        )
    seq_logp = masked_sum(logp, mask)  # (N,)
    # Zero invalid advantages first so a NaN there cannot reach the gradient via 0 * NaN.
    adv = torch.where(valid, advantages.detach(), torch.zeros_like(advantages))  # (N,)
    per_seq = torch.where(valid, adv * seq_logp, torch.zeros_like(seq_logp))  # (N,)
    n_valid = valid.sum().clamp(min=1)  # scalar
    return -per_seq.sum() / n_valid
