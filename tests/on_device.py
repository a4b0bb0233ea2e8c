"""How close two rewards of one item must be, by the dtype the trunk ran in: the service's
own tolerances (`service.self_check.tolerance`, the startup self-check's), with the spread
taken as the std of the rewards compared against.

fp32 rewards agree to 1e-4 in reward units whatever the batch, backend or device; 16-bit
rewards to a share of the rewards' spread (the measurements behind it: the comment on
`service.self_check.OF_SPREAD`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.self_check import tolerance


def assert_rewards_agree(got: Sequence[float], want: Sequence[float], dtype: str) -> None:
    """`got` within the tolerance of `dtype` from `want` (its spread: the std of `want`)."""
    got_a, want_a = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got_a.shape == want_a.shape
    bound = tolerance(dtype, float(np.std(want_a)))
    assert bound > 0, "16-bit rewards are compared on items whose rewards differ"
    worst = float(np.max(np.abs(got_a - want_a)))
    assert worst <= bound, f"{dtype}: max |got - want| {worst:.3g} > {bound:.3g}"
