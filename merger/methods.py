"""Merge methods as pure tensor functions: weighted average, SLERP of task vectors, LITI.

No file, network or device I/O here. Shapes: every tensor argument has the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Below this angle (radians) or norm, SLERP falls back to linear interpolation: sin(omega)
# is too small to divide by and the two directions are the same anyway.
_SLERP_EPS = 1e-6


def accumulate(acc: torch.Tensor, x: torch.Tensor, weight: float) -> None:
    """acc += weight * x, computed in acc's dtype (x is promoted, never rounded down)."""
    acc.add_(x, alpha=weight)


def weighted_average(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], acc_dtype: torch.dtype
) -> torch.Tensor:
    """(sum_i w_i * x_i) / sum_i w_i in acc_dtype, summed in the given order.

    Raw weights are summed first and divided once at the end: with integer weights the sum
    of fp32 (or bf16) inputs is exact in fp64 (fp32), so the one division rounds correctly,
    ties included; multiplying by pre-normalised weights such as 1/3 would not.
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"{len(tensors)} tensors for {len(weights)} weights")
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype)
    for x, w in zip(tensors, weights, strict=True):
        accumulate(acc, x, w)
    return acc.div_(math.fsum(weights))


def liti_weights(weights: Sequence[float], eta: float) -> tuple[float, tuple[float, ...]]:
    """(init weight, member weights) of (1 - eta) * init + eta * mean_w(x), same total."""
    total = math.fsum(weights)
    return (1.0 - eta) * total, tuple(eta * w for w in weights)


def slerp_pair(d1: torch.Tensor, d2: torch.Tensor, t: float) -> torch.Tensor:
    """WARP's SLERP of two task vectors: sin((1-t)W)/sin(W) * d1 + sin(tW)/sin(W) * d2.

    W is the angle between d1 and d2 (flattened). Degenerate cases (a zero vector, parallel
    or antiparallel directions) fall back to linear interpolation.
    """
    n1 = torch.linalg.vector_norm(d1, dtype=torch.float64).item()
    n2 = torch.linalg.vector_norm(d2, dtype=torch.float64).item()
    if n1 < _SLERP_EPS or n2 < _SLERP_EPS:
        return (1.0 - t) * d1 + t * d2
    dot = torch.sum(d1.to(torch.float64) * d2.to(torch.float64)).item()
    omega = math.acos(max(-1.0, min(1.0, dot / (n1 * n2))))
    sin_omega = math.sin(omega)
    if sin_omega < _SLERP_EPS:
        return (1.0 - t) * d1 + t * d2
    a = math.sin((1.0 - t) * omega) / sin_omega
    b = math.sin(t * omega) / sin_omega
    return a * d1 + b * d2


def slerp_task_vectors(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Iterative SLERP of M task vectors (WARP, appendix B.3), weighted.

    r_1 = d_1; r_i = slerp(r_{i-1}, d_i, w_i / (w_1 + ... + w_i)). With uniform weights
    this is slerp(..., 1/i) at step i. Members with zero weight are skipped.
    """
    pairs = [(d, w) for d, w in zip(deltas, weights, strict=True) if w > 0]
    if not pairs:
        raise ValueError("slerp needs at least one member with a positive weight")
    result, cumulative = pairs[0][0], pairs[0][1]
    for delta, w in pairs[1:]:
        cumulative += w
        result = slerp_pair(result, delta, w / cumulative)
    return result


def slerp_merge(
    init: torch.Tensor,
    members: Sequence[torch.Tensor],
    weights: Sequence[float],
    compute_dtype: torch.dtype,
    eta: float = 1.0,
) -> torch.Tensor:
    """init + eta * SLERP of the task vectors (members - init), in compute_dtype."""
    base = init.to(compute_dtype)
    deltas = [m.to(compute_dtype) - base for m in members]
    return base + eta * slerp_task_vectors(deltas, weights)
