"""How close two rewards of one item must be, by the dtype the trunk ran in.

fp32 rewards agree to 1e-4 in reward units whatever the batch, backend or device. A 16-bit
trunk rounds each matrix product, and the rounding depends on the shapes it runs in (the
batch an item is padded into, the kernel a device picks): 16-bit rewards are compared in
units of the rewards' own spread, to a fraction measured on the suite's models and MiniLM
(benchmarks/RESULTS.md, "bf16 serving": up to 4.8% of the std between bf16 and fp32, 2.1%
across batches) with room for other devices' kernels. fp16 keeps 3 more mantissa bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ABSOLUTE = {"float32": 1e-4}
OF_SPREAD = {"bfloat16": 0.10, "float16": 0.02}


def assert_rewards_agree(got: Sequence[float], want: Sequence[float], dtype: str) -> None:
    """`got` within the tolerance of `dtype` from `want` (its spread: the std of `want`)."""
    got_a, want_a = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got_a.shape == want_a.shape
    if dtype in ABSOLUTE:
        bound = ABSOLUTE[dtype]
    else:
        bound = OF_SPREAD[dtype] * float(np.std(want_a))
        assert bound > 0, "16-bit rewards are compared on items whose rewards differ"
    worst = float(np.max(np.abs(got_a - want_a)))
    assert worst <= bound, f"{dtype}: max |got - want| {worst:.3g} > {bound:.3g}"
