"""Pure merge math against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import pytest
import torch

from merger.methods import (
    BufferPool,
    Rounder,
    accumulate,
    average,
    liti_weights,
    round_to,
    simplex,
    slerp_merge,
    slerp_pair,
    slerp_task_vectors,
)


def test_weights_are_normalised_to_the_simplex() -> None:
    assert simplex((2.0, 1.0, 1.0)) == (0.5, 0.25, 0.25)
    assert simplex((1.0, 1.0)) == (0.5, 0.5)
    with pytest.raises(ValueError, match="positive total"):
        simplex((0.0, 0.0))


def test_weighted_average_hand_values() -> None:
    a = torch.tensor([1.0, 2.0, -4.0])
    b = torch.tensor([3.0, 6.0, 8.0])
    out = average([a, b], [1.0, 3.0], torch.float32)  # (1*a + 3*b) / 4
    assert out.tolist() == [2.5, 5.0, 5.0]


def test_weighted_average_of_bf16_is_computed_in_the_accumulator_dtype() -> None:
    # 1 + 2^-8 is exact in fp32 but not in bf16 (8 mantissa bits): no bf16 arithmetic.
    a = torch.tensor([1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)
    out = average([a, b], [1.0, 1.0], torch.float32)
    assert out.dtype == torch.float32
    assert out.item() == 1.0 + 2**-8


def test_fp64_accumulation_gives_the_correctly_rounded_fp32_mean() -> None:
    # Three fp32 inputs whose uniform mean is off by one fp32 ulp when summed in fp32.
    values = [float.fromhex(h) for h in ("-0x1.bc4abap-2", "0x1.d47218p-2", "0x1.33a05cp-1")]
    exact = sum((Fraction(v) for v in values), Fraction(0)) / 3
    expected = torch.tensor(float(exact), dtype=torch.float32).item()
    xs = [torch.tensor([v], dtype=torch.float32) for v in values]
    w = [1.0, 1.0, 1.0]
    in_fp32 = torch.zeros(1, dtype=torch.float32)  # the same sum, accumulated in fp32
    for x, weight in zip(xs, w, strict=True):
        accumulate(in_fp32, x, weight)
    in_fp32 = in_fp32.div_(3).item()
    in_fp64 = average(xs, w, torch.float32).item()
    assert in_fp32 != expected
    assert in_fp64 == expected == float.fromhex("0x1.aa4564p-3")


def test_round_to_avoids_double_rounding_through_fp32() -> None:
    # bf16 spacing at 1 is 2^-7; 1 + 2^-8 is the midpoint. Just above it the correct result
    # is 1 + 2^-7, but fp64 -> fp32 lands exactly on the midpoint and ties-to-even gives 1.
    above = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)], dtype=torch.float64)
    assert above.to(torch.bfloat16).tolist() == [1.0, -1.0]  # torch's cast rounds twice
    assert round_to(above, torch.bfloat16).tolist() == [1 + 2**-7, -(1 + 2**-7)]
    below = torch.tensor([1 + 2**-8 - 2**-30], dtype=torch.float64)
    assert round_to(below, torch.bfloat16).tolist() == [1.0]
    tie = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8], dtype=torch.float64)  # ties go to even
    assert round_to(tie, torch.bfloat16).tolist() == [1.0, 1 + 2 * 2**-7]
    # fp16: spacing 2^-10 at 1.
    half = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert round_to(half, torch.float16).tolist() == [1 + 2**-10]


def test_round_to_special_values() -> None:
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-300, -1e-300, 1e39])
    out = round_to(x.double(), torch.bfloat16)
    assert out[:4].tolist() == [0.0, -0.0, float("inf"), float("-inf")]
    assert str(out[1].item()) == "-0.0"
    assert out[4:6].tolist() == [0.0, -0.0]  # underflow keeps its sign
    assert out[6].item() == float("inf")  # overflow
    assert torch.isnan(
        round_to(torch.tensor([float("nan")], dtype=torch.float64), torch.bfloat16)
    ).all()
    exact = torch.tensor([0.5, -3.25], dtype=torch.float64)
    assert round_to(exact, torch.float32).tolist() == [0.5, -3.25]


def _nearest_even(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference: round fp64 straight to `dtype`'s precision on the fp64 bits (normal range).

    bf16 keeps 7 of fp64's 52 fraction bits, fp16 keeps 10: add half an ulp minus one, plus
    the kept lowest bit (ties to even), and clear the dropped bits. Exact in fp32 afterwards.
    """
    dropped = 52 - {torch.bfloat16: 7, torch.float16: 10}[dtype]
    bits = x.view(torch.int64)
    lsb = (bits >> dropped) & 1
    rounded = (bits + (1 << (dropped - 1)) - 1 + lsb) & ~((1 << dropped) - 1)
    return rounded.view(torch.float64).to(torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounder_matches_rounding_straight_from_fp64(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(4096, generator=gen, dtype=torch.float64).to(dtype).double()
    ulp = grid.abs() * 2.0 ** (-8 if dtype is torch.bfloat16 else -11)  # about half an ulp
    cases = torch.cat(
        [
            grid,  # exact: no rounding at all
            grid + ulp,  # near (or on) a tie
            grid + ulp * (1 + 2**-25),  # just above a tie: fp32 lands on the tie
            grid + ulp * (1 - 2**-25),  # just below
            torch.randn(4096, generator=gen, dtype=torch.float64),
        ]
    )
    cases = cases[cases.abs() > 2**-14]  # the reference covers the normal range only
    rounder = Rounder(BufferPool(1000))  # smaller than the input: buffers grow
    for chunk in (cases[:7], cases, cases[3:].reshape(-1, 1)):
        got = rounder.round(chunk, dtype)
        assert torch.equal(got.view(torch.int16), _nearest_even(chunk, dtype).view(torch.int16))
    assert torch.equal(round_to(cases, dtype), _nearest_even(cases, dtype))
    # The fused division: x / d rounded to fp64, then correctly to dtype.
    got = rounder.round(cases * 4, dtype, divisor=4.0)  # exact scaling: the same values
    assert torch.equal(got.view(torch.int16), _nearest_even(cases, dtype).view(torch.int16))
    cases = cases[(cases / 3.0).abs() > 2**-14]
    got = rounder.round(cases, dtype, divisor=3.0)
    assert torch.equal(got.view(torch.int16), _nearest_even(cases / 3.0, dtype).view(torch.int16))


def test_rounder_fp16_below_the_normal_range() -> None:
    # fp16 subnormals are spaced 2^-24; fp32 rounds first at a finer spacing, so a value
    # just above half a subnormal step lands on the midpoint and would tie to even (0).
    x = torch.tensor([2**-25 + 2**-60, 3 * 2**-25, 2**-25], dtype=torch.float64)
    assert x.to(torch.float16).tolist()[0] == 0.0  # torch's cast rounds twice
    assert round_to(x, torch.float16).tolist() == [2**-24, 2 * 2**-24, 0.0]


def test_rounder_bf16_below_fp32_normal_range() -> None:
    # bf16 subnormals are spaced 2^-133, fp32's 2^-149: a value 2^-152 above a bf16
    # midpoint lands on it in fp32 and ties to even; the bit-level rounding to odd cannot
    # apply there (fp32 keeps fewer bits), so these elements take the exact path.
    tiny = [2**-134 + 2**-152, 5 * 2**-134 + 2**-152, 2**-134 - 2**-152, -(2**-134 + 2**-152)]
    x = torch.tensor([1.0, *tiny, 0.0, 1 + 2**-8 + 2**-30], dtype=torch.float64)
    assert x.to(torch.bfloat16)[1:3].tolist() == [0.0, 2 * 2**-133]  # torch rounds twice
    assert round_to(x, torch.bfloat16).tolist() == [
        1.0,
        2**-133,
        3 * 2**-133,
        0.0,
        -(2**-133),
        0.0,
        1 + 2**-7,
    ]
    got = Rounder(BufferPool(2)).round(x * 8, torch.bfloat16, divisor=8.0)
    assert got.tolist() == round_to(x, torch.bfloat16).tolist()
    # fp16 has nothing that small: it all rounds to zero, keeping the sign.
    assert [str(v) for v in round_to(x[1:5], torch.float16).tolist()] == [
        "0.0",
        "0.0",
        "0.0",
        "-0.0",
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounder_empty_tensors(dtype: torch.dtype) -> None:
    for shape in ((0,), (3, 0)):
        got = round_to(torch.empty(shape, dtype=torch.float64), dtype)
        assert got.shape == shape and got.dtype == dtype


def test_accumulate_through_a_scratch_buffer_is_the_same_sum() -> None:
    x = torch.tensor([1.5, -2.25, 2**-20], dtype=torch.bfloat16)
    plain = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    scratched = plain.clone()
    accumulate(plain, x, 0.75)
    accumulate(scratched, x, 0.75, torch.empty(3, dtype=torch.float64))
    assert torch.equal(plain, scratched)
    assert plain.tolist() == [0.5 + 1.125, 0.25 - 1.6875, 1.0 + 0.75 * 2**-20]  # all exact
    fresh = torch.full((3,), float("nan"), dtype=torch.float64)  # contents ignored
    accumulate(fresh, x, 0.75, first=True)
    assert fresh.tolist() == [1.125, -1.6875, 0.75 * 2**-20]
    zeros = torch.tensor([-0.0, -0.0], dtype=torch.bfloat16)
    accumulate(fresh[:2], zeros, 1.0, first=True)
    accumulate(fresh[:2], zeros, 1.0)
    assert [str(v) for v in fresh[:2].tolist()] == ["-0.0", "-0.0"]  # -0 + -0 = -0


def test_buffer_pool_reuses_and_grows() -> None:
    pool = BufferPool(8)
    a = pool.get("acc", torch.float64, (2, 3))
    assert pool.get("acc", torch.float64, (2, 3)).data_ptr() == a.data_ptr()
    assert pool.get("acc", torch.float64, (6,)).data_ptr() == a.data_ptr()  # same storage
    assert pool.get("other", torch.float64, (6,)).data_ptr() != a.data_ptr()
    big = pool.get("acc", torch.float64, (4, 4))  # larger than the buffer: a new one
    assert big.shape == (4, 4)
    assert pool.get("acc", torch.float64, (2, 3)).data_ptr() == big.data_ptr()


def test_liti_weights() -> None:
    init_w, member_w = liti_weights([2.0, 1.0, 1.0], 0.25)  # totals stay 4: 3 + 0.5+0.25+0.25
    assert init_w == 3.0
    assert member_w == (0.5, 0.25, 0.25)


def test_slerp_pair_orthogonal_unit_vectors() -> None:
    e = torch.eye(2, dtype=torch.float64)
    out = slerp_pair(e[0], e[1], 0.5)
    s = math.sqrt(2) / 2  # sin(pi/4) / sin(pi/2)
    assert out.tolist() == pytest.approx([s, s])


def test_slerp_pair_endpoints_and_unequal_norms() -> None:
    d1 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    d2 = torch.tensor([0.0, 3.0], dtype=torch.float64)
    assert slerp_pair(d1, d2, 0.0).tolist() == pytest.approx([2.0, 0.0])
    assert slerp_pair(d1, d2, 1.0).tolist() == pytest.approx([0.0, 3.0])
    # Omega = pi/2: coefficients sin((1-t)pi/2) and sin(t pi/2) on the raw task vectors.
    t = 1 / 3
    expected = [2.0 * math.sin(2 * math.pi / 6), 3.0 * math.sin(math.pi / 6)]
    assert slerp_pair(d1, d2, t).tolist() == pytest.approx(expected)


def test_slerp_pair_degenerate_falls_back_to_lerp() -> None:
    d = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert slerp_pair(d, 3 * d, 0.5).tolist() == pytest.approx([2.0, 2.0])  # parallel
    zero = torch.zeros(2, dtype=torch.float64)
    assert slerp_pair(zero, d, 0.25).tolist() == pytest.approx([0.25, 0.25])


def test_iterative_slerp_of_three_orthogonal_task_vectors() -> None:
    # Step 1: slerp(e1, e2, 1/2) = (s, s, 0) with s = sqrt(2)/2 (unit norm).
    # Step 2: slerp(r, e3, 1/3), Omega = pi/2: sin(pi/3) r + sin(pi/6) e3.
    e = torch.eye(3, dtype=torch.float64)
    out = slerp_task_vectors([e[0], e[1], e[2]], [1.0, 1.0, 1.0])
    c = math.sqrt(6) / 4
    assert out.tolist() == pytest.approx([c, c, 0.5])


def test_weighted_slerp_skips_zero_weights() -> None:
    e = torch.eye(3, dtype=torch.float64)
    out = slerp_task_vectors([e[0], e[1], e[2]], [1.0, 0.0, 1.0])
    s = math.sqrt(2) / 2
    assert out.tolist() == pytest.approx([s, 0.0, s])


def test_slerp_merge_adds_init_and_scales_by_eta() -> None:
    init = torch.tensor([10.0, 10.0])
    members = [torch.tensor([11.0, 10.0]), torch.tensor([10.0, 11.0])]
    s = math.sqrt(2) / 2
    full = slerp_merge(init, members, [0.5, 0.5], torch.float64)
    assert full.tolist() == pytest.approx([10 + s, 10 + s])
    half = slerp_merge(init, members, [0.5, 0.5], torch.float64, eta=0.5)
    assert half.tolist() == pytest.approx([10 + s / 2, 10 + s / 2])


def test_average_reads_its_inputs_one_at_a_time_as_the_merge_does() -> None:
    # The streaming merge fills one buffer per input in turn; the result is the same as
    # averaging separate tensors, and lands in the pool's buffers.
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 7, generator=gen, dtype=torch.float32) for _ in range(3)]
    buffer = torch.empty(5, 7)

    def one_buffer() -> Iterator[torch.Tensor]:
        for x in xs:
            yield buffer.copy_(x)

    pool = BufferPool(64)
    streamed = average(one_buffer(), [1.0, 2.0, 3.0], torch.bfloat16, pool)
    exact = (xs[0].double() + 2 * xs[1].double() + 3 * xs[2].double()) / 6
    assert torch.equal(streamed, round_to(exact, torch.bfloat16))
    assert streamed.data_ptr() == pool.get("rounded", torch.bfloat16, (5, 7)).data_ptr()
    with pytest.raises(ValueError, match="at least one input"):
        average([], [], torch.float32)


def test_slerp_merge_is_computed_in_fp64_and_rounded_once() -> None:
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(64, generator=gen).to(torch.bfloat16)
    members = [init.float() + 0.01 * torch.randn(64, generator=gen) for _ in range(2)]
    base = init.double()
    exact = base + 0.5 * slerp_task_vectors([m.double() - base for m in members], [1.0, 1.0])
    got = slerp_merge(init, iter(members), [1.0, 1.0], torch.bfloat16, eta=0.5)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, round_to(exact, torch.bfloat16))
