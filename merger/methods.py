"""Merge methods as pure tensor functions: weighted average, SLERP of task vectors, LITI.

No file, network or device I/O here. Shapes: every tensor argument has the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
import torch

# Every merge sums in fp64: the weighted sum of fp32/bf16/fp16 inputs with small integer
# weights is then exact (short of a 2^29 magnitude spread), and one final rounding gives the
# correctly rounded result. fp32 accumulation is measurably off: see tests/test_methods.py.
ACC_DTYPE = torch.float64

# Below this angle (radians) or norm, SLERP falls back to linear interpolation: sin(omega)
# is too small to divide by and the two directions are the same anyway.
_SLERP_EPS = 1e-6


def accumulate(
    acc: torch.Tensor,
    x: torch.Tensor,
    weight: float,
    scratch: torch.Tensor | None = None,
    *,
    first: bool = False,
) -> None:
    """acc += weight * x, computed in acc's dtype (x is promoted, never rounded down).

    `scratch` (acc's dtype and shape) takes the promoted x: a converting copy followed by a
    same-dtype add is about 3x faster than torch's mixed-dtype add, with the same result.
    With `first`, acc's contents are ignored: acc = weight * x, without zeroing it first
    (the same values; a sum of negative zeros then stays -0.0, as IEEE addition has it).
    """
    if first:
        acc.copy_(x)
        if weight != 1.0:
            acc.mul_(weight)
        return
    if scratch is not None and x.dtype != acc.dtype:
        x = scratch.copy_(x)
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


# (mask, pattern) of the fp32 bits that a 16-bit format drops, when they make an exact tie.
_TIE_BITS = {torch.bfloat16: (0xFFFF, 0x8000), torch.float16: (0x1FFF, 0x1000)}
_FP16_MIN_NORMAL = 2.0**-14  # below it fp16 drops more than 13 bits of an fp32
_FP16_MIN_NORMAL_BITS = 0x38800000  # the fp32 bits of 2^-14


def _round_via_odd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Round fp64 -> fp32 *to odd* (truncate, set the last bit when inexact): the second
    # rounding to a format at least 2 bits narrower is then the correctly rounded one.
    r = x.to(torch.float32)
    back = r.to(torch.float64)
    inexact = (back != x) & ~torch.isnan(x)
    away = inexact & (back.abs() > x.abs())
    bits = r.view(torch.int32) - away.to(torch.int32)  # sign-magnitude: one ulp toward 0
    bits |= inexact.to(torch.int32)
    return bits.view(torch.float32).to(dtype)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correctly rounded (nearest-even) cast of an fp64 tensor to `dtype`.

    torch casts fp64 to bf16/fp16 through fp32, rounding twice: wrong exactly when the fp32
    value lands on a 16-bit tie it did not start on. Those elements (about 2^-16 of them,
    plus fp16's subnormal range) are found by their fp32 bits and re-rounded via round-to-odd.
    """
    return Rounder(BufferPool(x.numel())).round(x, dtype)


class BufferPool:
    """Named buffers reused chunk after chunk: a fresh multi-MB temporary per chunk costs
    more than the arithmetic on it (allocation and page faults) on the measured machine."""

    def __init__(self, elements: int) -> None:
        self.elements = elements
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._views: dict[tuple[str, torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A view of `shape` over buffer (`name`, `dtype`), grown on demand (contents undefined)."""
        key = (name, dtype, tuple(shape))
        view = self._views.get(key)
        if view is not None:
            return view
        n = math.prod(key[2])
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[name, dtype] = torch.empty(max(n, self.elements), dtype=dtype)
            self._views = {k: v for k, v in self._views.items() if k[:2] != (name, dtype)}
        view = self._views[key] = buf[:n].view(key[2])
        return view


class Rounder:
    """`round_to` into buffers of a pool; a returned tensor is valid until the next call."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool

    def round(self, x: torch.Tensor, dtype: torch.dtype, divisor: float = 1.0) -> torch.Tensor:
        """x / divisor (x fp64, the quotient rounded to fp64 first) correctly rounded to
        `dtype`, in a reused buffer. The division is fused into the first cast: one pass less."""
        x = x.contiguous()
        if dtype not in _TIE_BITS:  # fp64 -> fp32 is one rounding
            return torch.div(x, divisor, out=self._pool.get("rounded", dtype, x.shape))
        r = torch.div(x, divisor, out=self._pool.get("round-fp32", torch.float32, x.shape))
        out = self._pool.get("rounded", dtype, x.shape).copy_(r)
        idx = self._suspects(r, dtype)
        if not idx.size:
            return out
        flat_idx = torch.from_numpy(idx)
        quotient = x.view(-1)[flat_idx] / divisor
        # Where the fp32 step was exact, the cast was a single rounding after all.
        inexact = quotient != r.view(-1)[flat_idx]
        out.view(-1)[flat_idx[inexact]] = _round_via_odd(quotient[inexact], dtype)
        return out

    def _suspects(self, r: torch.Tensor, dtype: torch.dtype) -> npt.NDArray[np.int64]:
        """Flat indexes where r (fp32) is on a `dtype` tie (or, for fp16, below its normals).

        Integer reductions over the fp32 bits rule most chunks out without a bool mask.
        """
        bits = r.view(-1).view(torch.int32)
        if not bits.numel():
            return np.empty(0, dtype=np.int64)
        mask, tie = _TIE_BITS[dtype]
        distance = self._pool.get("round-tie", torch.int32, bits.shape)
        torch.bitwise_and(bits, mask, out=distance).sub_(tie).abs_()  # 0 exactly on a tie
        found = int(distance.min()) == 0
        magnitude = None
        if dtype is torch.float16:
            magnitude = self._pool.get("round-magnitude", torch.int32, bits.shape)
            torch.bitwise_and(bits, 0x7FFFFFFF, out=magnitude)  # |r| as bits
            found = found or int(magnitude.min()) < _FP16_MIN_NORMAL_BITS
        if not found:
            return np.empty(0, dtype=np.int64)
        suspect = distance.numpy() == 0
        if magnitude is not None:
            suspect |= magnitude.numpy() < _FP16_MIN_NORMAL_BITS
        return np.flatnonzero(suspect)


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


def slerp_task_vectors(deltas: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Iterative SLERP of M task vectors (WARP, appendix B.3), weighted.

    r_1 = d_1; r_i = slerp(r_{i-1}, d_i, w_i / (w_1 + ... + w_i)). With uniform weights
    this is slerp(..., 1/i) at step i. Members with zero weight are skipped. `deltas` is
    consumed lazily, so a caller can produce one task vector at a time.
    """
    result: torch.Tensor | None = None
    cumulative = 0.0
    for delta, w in zip(deltas, weights, strict=True):
        if w <= 0:
            continue
        cumulative += w
        result = delta if result is None else slerp_pair(result, delta, w / cumulative)
    if result is None:
        raise ValueError("slerp needs at least one member with a positive weight")
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
