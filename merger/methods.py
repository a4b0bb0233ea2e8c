"""Merge methods as pure tensor functions: the arithmetic `warm-merge build` runs.

One function per method, called by the streaming merge (`merger.build`) on each chunk of
each tensor, and tested here as it runs there:
- `average`: the weighted average (WARM; rewarded soups' lambda on the simplex). LITI
  towards a shared initialisation is an average too, with that initialisation as one more
  term: `liti_weights` folds it in.
- `slerp_merge`: WARP's SLERP of task vectors around the initialisation, then LITI.

The weights keep the form they were given in (e.g. 1, 1, 2) all the way to the arithmetic:
the sum is taken with them in fp64 and divided once by their total, at the final rounding;
`simplex` is what the provenance record states. No file, network or device I/O here.
Shapes: every tensor argument has the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

# Every merge sums in fp64: the weighted sum of fp32/bf16/fp16 inputs with small integer
# weights is then exact (short of a 2^29 magnitude spread), and one final rounding gives the
# correctly rounded result. fp32 accumulation is measurably off: see tests/merger/test_methods.py.
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
    same-dtype add is faster than torch's mixed-dtype add, with the same result.
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


def liti_weights(weights: Sequence[float], eta: float) -> tuple[float, tuple[float, ...]]:
    """(init weight, member weights) of (1 - eta) * init + eta * mean_w(x), same total."""
    total = math.fsum(weights)
    return (1.0 - eta) * total, tuple(eta * w for w in weights)


# fp64 keeps 29 more fraction bits than fp32. Rounding fp64 to *odd* at fp32's precision
# (clear those bits; set the lowest kept one when any was set) makes the second rounding,
# to a format at least 2 bits narrower than fp32, the correctly rounded one.
_FP32_DROPPED = (1 << 29) - 1
_FP32_MIN_NORMAL_BITS = 0x00800000  # below it fp32 is subnormal: fewer than 24 bits kept
_MAGNITUDE_32 = 0x7FFFFFFF


def _round_via_odd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Round fp64 -> fp32 *to odd* by way of fp32's own cast (correct in its subnormal range
    # too): truncate, set the last bit when inexact. Used for the few elements below fp32's
    # normal range, where the bit-level rounding in Rounder does not apply.
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
    value lands on a 16-bit tie it did not start on. Rounding to odd on the way avoids it.
    """
    return Rounder(BufferPool(x.numel())).round(x, dtype)


class BufferPool:
    """Named buffers reused chunk after chunk: a fresh multi-MB temporary per chunk can cost
    more than the arithmetic on it (allocation and page faults)."""

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


def _divide(x: torch.Tensor, divisor: float, out: torch.Tensor) -> torch.Tensor:
    """x / divisor into `out` (which may be x); a multiplication when that is exact."""
    if divisor == 1.0:
        return out if out is x else out.copy_(x)
    if math.frexp(divisor)[0] == 0.5 and math.isfinite(1.0 / divisor):
        # 2^k: x * 2^-k is the same fp64 result, and a multiplication is cheaper
        return torch.mul(x, 1.0 / divisor, out=out)
    return torch.div(x, divisor, out=out)


class Rounder:
    """`round_to` into buffers of a pool; a returned tensor is valid until the next call."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool

    def round(
        self, x: torch.Tensor, dtype: torch.dtype, divisor: float = 1.0, *, consume: bool = False
    ) -> torch.Tensor:
        """x / divisor (x fp64, the quotient rounded to fp64 first) correctly rounded to
        `dtype`, in a reused buffer; with `consume`, x (contiguous fp64) is overwritten.

        To fp32 that is one rounding. To bf16/fp16, the quotient is first rounded to odd at
        fp32's precision with integer operations on its bits, so torch's cast through fp32
        rounds correctly: four whole-chunk passes and no per-element branch.
        """
        x = x.contiguous()
        if dtype not in (torch.bfloat16, torch.float16):  # fp64 -> fp32 is one rounding
            return _divide(x, divisor, self._pool.get("rounded", dtype, x.shape))
        if consume and x.dtype is not torch.float64:
            raise ValueError(f"consume needs an fp64 tensor, got {x.dtype}")
        q = x if consume else self._pool.get("round-q", torch.float64, x.shape)
        bits = _divide(x, divisor, q).view(torch.int64)
        # (dropped bits + all ones) carries into the lowest kept bit exactly when any dropped
        # bit is set; OR that in, then clear the dropped bits. Inf and NaN stay what they are.
        sticky = self._pool.get("round-sticky", torch.int64, bits.shape)
        torch.bitwise_and(bits, _FP32_DROPPED, out=sticky).add_(_FP32_DROPPED)
        bits.bitwise_or_(sticky).bitwise_and_(~_FP32_DROPPED)
        r = self._pool.get("round-fp32", torch.float32, x.shape).copy_(q)  # exact, or subnormal
        out = self._pool.get("rounded", dtype, x.shape).copy_(r)
        if dtype is torch.bfloat16:  # fp16 flushes fp32's subnormal range to +-0 anyway
            self._fix_subnormal(q, r, out)
        return out

    def _fix_subnormal(self, odd: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> None:
        """Re-round the elements in fp32's subnormal range, where the cast of `odd` (rounded
        to odd at 24 bits) to fp32 rounded again: rounding it to odd on fp32's own grid
        gives what rounding the quotient there would (odd rounding composes)."""
        if not r.numel():
            return
        magnitude = self._pool.get("round-magnitude", torch.int32, r.shape)
        torch.bitwise_and(r.view(torch.int32), _MAGNITUDE_32, out=magnitude)
        # magnitude - 1, with 0 (an exact zero) wrapped to the largest value: one reduction.
        magnitude.sub_(1).bitwise_and_(_MAGNITUDE_32)
        if int(magnitude.min()) >= _FP32_MIN_NORMAL_BITS - 1:
            return
        tiny = magnitude.view(-1).numpy() < _FP32_MIN_NORMAL_BITS - 1
        idx = torch.from_numpy(np.flatnonzero(tiny))
        out.view(-1)[idx] = _round_via_odd(odd.view(-1)[idx], out.dtype)


def simplex(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights divided by their total: what a merge record states (the arithmetic does not
    use these; see the module docstring)."""
    total = math.fsum(weights)
    if not weights or total <= 0:
        raise ValueError(f"weights {tuple(weights)}: need a positive total")
    return tuple(w / total for w in weights)


def average(
    inputs: Iterable[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype,
    pool: BufferPool | None = None,
) -> torch.Tensor:
    """(sum_i w_i * x_i) / sum_i w_i, summed in fp64 in the given order, correctly rounded
    once to `dtype`.

    Raw weights are summed first and divided once at the end: with integer weights the sum
    of fp32 (or bf16) inputs is exact in fp64, so the one division rounds correctly, ties
    included; multiplying by pre-normalised weights such as 1/3 would not.
    `inputs` is read lazily, one tensor at a time: a caller may fill one buffer for each.
    With `pool`, the result lives in its buffers (valid until the next call on that pool).
    """
    pool = pool if pool is not None else BufferPool(0)
    acc: torch.Tensor | None = None
    promoted: torch.Tensor | None = None
    for x, w in zip(inputs, weights, strict=True):
        if acc is None:
            acc = pool.get("acc", ACC_DTYPE, x.shape)
            promoted = pool.get("promoted", ACC_DTYPE, x.shape)
            accumulate(acc, x, w, first=True)
        else:
            accumulate(acc, x, w, promoted)
    if acc is None:
        raise ValueError("an average needs at least one input")
    return Rounder(pool).round(acc, dtype, divisor=math.fsum(weights), consume=True)


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
    members: Iterable[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype,
    eta: float = 1.0,
) -> torch.Tensor:
    """init + eta * SLERP of the task vectors (members - init), computed in fp64 and
    correctly rounded to `dtype`. `members` is read lazily, one tensor at a time (those of
    zero weight too: skip them before, to save the read)."""
    base = init.to(ACC_DTYPE)
    deltas = (m.to(ACC_DTYPE) - base for m in members)
    return round_to(base + eta * slerp_task_vectors(deltas, weights), dtype)
