"""Warm-up calibration: the batch budget and fixed cost from hand-made timings, and the
batches it times (tiny BERT)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from service.backends.transformers import TransformersBackend
from service.budget import Calibration, calibrate, choose_budget
from service.encoding import Encoder
from service.loader import load_model
from service.settings import Settings


def test_a_cpu_like_curve_gives_the_peak_batch_and_the_fitted_overhead() -> None:
    # Rates 50, 62.5, 71.4, 80, 72.7, 66.7 items/s: only batch 8 is within 3% of the best.
    seconds = {1: 0.02, 2: 0.032, 4: 0.056, 8: 0.1, 16: 0.22, 32: 0.48}
    got = choose_budget(seconds, length=128, max_batch_tokens=16384, max_length=512, tolerance=0.03)
    # per token (0.1 - 0.02) / (7 * 128); overhead 0.02 / per_token - 128 = 224 - 128.
    assert got.batch_tokens == 8 * 128
    assert got.overhead_tokens == pytest.approx(96.0)


def test_a_flat_noisy_cpu_curve_gives_the_smallest_batch_within_the_noise() -> None:
    # A 1-thread MiniLM warm-up as logged: 48.9, 57.2, 56.4, 57.7, 54.9, 60.9, 59.3 items/s.
    rates = {1: 48.9, 2: 57.2, 4: 56.4, 8: 57.7, 16: 54.9, 32: 60.9, 64: 59.3}
    seconds = {size: size / rate for size, rate in rates.items()}
    # Within 3% of 60.9 (>= 59.07): 32 and 64, so 32 x 128 tokens, a batch picked by noise.
    tight = choose_budget(
        seconds, length=128, max_batch_tokens=8192, max_length=512, tolerance=0.03
    )
    assert tight.batch_tokens == 4096
    # Within 10% (>= 54.81): 2 is the smallest, 256 tokens.
    loose = choose_budget(seconds, length=128, max_batch_tokens=8192, max_length=128, tolerance=0.1)
    assert loose.batch_tokens == 256


def test_a_gpu_like_curve_keeps_the_configured_budget() -> None:
    seconds = {1: 0.01, 2: 0.01, 4: 0.01, 8: 0.011, 16: 0.012}  # still rising at 16
    got = choose_budget(seconds, length=128, max_batch_tokens=16384, max_length=512, tolerance=0.03)
    # per token 0.001 / (7 * 128); overhead 0.01 / per_token - 128 = 8960 - 128.
    assert got.batch_tokens == 16384
    assert got.overhead_tokens == pytest.approx(8832.0)


def test_a_small_peak_still_fits_one_item_of_the_longest_length() -> None:
    seconds = {1: 0.01, 2: 0.015, 4: 0.04}  # 100, 133, 100 items/s: batch 2 = 256 tokens
    got = choose_budget(seconds, length=128, max_batch_tokens=16384, max_length=512, tolerance=0.03)
    # No 8-item timing: the fit runs through 4 items, per token 0.03 / (3 * 128).
    assert got.batch_tokens == 512
    assert got.overhead_tokens == pytest.approx(0.0, abs=1e-9)


def test_free_batching_favours_full_batches() -> None:
    seconds = {1: 0.01, 2: 0.01, 4: 0.01, 8: 0.01}
    got = choose_budget(seconds, length=128, max_batch_tokens=4096, max_length=512, tolerance=0.03)
    assert got == Calibration(overhead_tokens=4096.0, batch_tokens=4096)


class Recording:
    """A real backend whose forwards are recorded."""

    def __init__(self, inner: TransformersBackend) -> None:
        self.inner = inner
        self.info = inner.info
        self.sizes: list[int] = []
        self.threads: set[int | None] = set()

    def forward(self, sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        self.sizes.append(len(sequences))
        self.threads.add(threads)
        return self.inner.forward(sequences, threads)


def test_calibration_times_doubling_batches_twice_and_picks_a_measured_budget(
    bert_rm: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bert_rm)
    backend = TransformersBackend(
        bert_rm,
        device="cpu",
        dtype="float32",
        max_length=64,
        pad_token_id=int(tokenizer.pad_token_id),
        trust_remote_code=False,
    )
    recording = Recording(backend)
    encoder = Encoder(tokenizer, max_length=64, separator="\n")
    got = calibrate(recording, encoder, 8, 300)  # type: ignore[arg-type]
    # Items of 64 tokens: 4 x 64 fits 300 tokens, 8 x 64 does not. A ragged pair warms up
    # first, then 1, 2 and 4 items are each timed twice (on a CPU nothing confirms the
    # budget with the longest items: memory does not limit it).
    assert recording.sizes == [2, 1, 1, 2, 2, 4, 4]
    # Batch 4, the largest timed, keeps the configured 300; 1 or 2 items give 64 or 128.
    assert got.batch_tokens in {300, 64, 128}
    assert got.overhead_tokens >= 0
    assert recording.threads == {None}  # the backend's own threads


@pytest.mark.usefixtures("restore_torch_threads")
def test_forwards_that_run_side_by_side_are_timed_on_one_thread_each(
    bert_rm: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(model=bert_rm, device="cpu", torch_threads=2, max_batch_size=4)
    with caplog.at_level(logging.INFO, logger="service.budget"):
        loaded = load_model(settings)
    assert loaded.cores is not None and loaded.cores.workers == 2
    assert "-token items on 1 thread(s): 1: " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.budget"):
        load_model(settings.model_copy(update={"model_workers": 1}))
    assert "-token items on every thread: 1: " in caplog.text
