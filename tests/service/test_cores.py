"""CoreShare: which forward gets how many CPU threads, by hand-worked sequences; and how
the loader sizes it from the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cores import CoreShare
from service.loader import LoadError, load_model
from service.settings import Settings


def test_a_lone_batch_takes_every_thread_and_the_second_worker_waits() -> None:
    cores = CoreShare(threads=2, workers=2)
    assert cores.take(0, behind=0) == 2
    assert cores.take(1, behind=1) is None  # no thread free: never oversubscribe
    assert cores.give(0) == 2
    assert cores.free == 2


def test_with_work_queued_two_forwards_run_side_by_side_on_one_thread_each() -> None:
    cores = CoreShare(threads=2, workers=2)
    assert cores.take(0, behind=1) == 1
    assert cores.take(1, behind=1) == 1
    assert cores.free == 0
    assert cores.give(1) == 1
    assert cores.give(0) == 1
    assert cores.free == 2


def test_only_the_primary_starts_work_on_an_idle_model() -> None:
    cores = CoreShare(threads=2, workers=2)
    assert cores.take(1, behind=1) is None  # the primary takes what comes first
    assert cores.take(0, behind=0) == 2
    cores.give(0)
    assert cores.take(0, behind=1) == 1
    assert cores.take(1, behind=0) == 1  # beside a running primary: its share


def test_the_primary_takes_what_is_left_while_another_forward_runs() -> None:
    cores = CoreShare(threads=2, workers=2)
    cores.take(0, behind=1)
    cores.take(1, behind=1)
    cores.give(0)
    assert cores.take(0, behind=0) == 1  # worker 1 still holds one thread


def test_with_work_queued_the_primary_leaves_a_thread_to_each_idle_side_worker() -> None:
    cores = CoreShare(threads=4, workers=3)
    assert cores.take(0, behind=2) == 2  # 4 free, 2 idle side workers, 2 batches behind
    assert cores.take(1, behind=0) == 1  # beside the primary: always one thread
    assert cores.take(2, behind=1) == 1
    assert cores.free == 0
    assert cores.give(0) == 2
    assert cores.take(0, behind=1) == 2  # no side worker idle: every free thread
    assert cores.give(1) == 1 and cores.give(2) == 1 and cores.give(0) == 2
    assert cores.take(0, behind=0) == 4  # nothing queued: every thread


def test_the_primary_keeps_threads_no_queued_batch_could_use() -> None:
    cores = CoreShare(threads=16, workers=16)
    assert cores.take(0, behind=1) == 15  # one batch behind: one side worker, not 15
    assert cores.take(1, behind=0) == 1
    cores.give(0)
    cores.give(1)
    assert cores.take(0, behind=3) == 13  # three behind: 16 - 3
    assert cores.take(1, behind=2) == 1


def test_fewer_workers_than_threads_still_use_every_thread_under_load() -> None:
    cores = CoreShare(threads=8, workers=2)
    assert cores.take(0, behind=1) == 7
    assert cores.take(1, behind=1) == 1
    assert cores.free == 0


def test_a_forward_gets_the_largest_allowed_count_up_to_its_share() -> None:
    # A compiled model, 16 threads, 16 workers: graphs for 1 and 16 threads only.
    cores = CoreShare(threads=16, workers=16, counts=(1, 16, 1))
    assert cores.counts == (1, 16)
    assert cores.take(0, behind=3) == 1  # its share, 13, has no graph: rounded down to 1
    assert cores.take(1, behind=2) == 1
    cores.give(0)
    cores.give(1)
    assert cores.take(0, behind=0) == 16  # a lone batch: every thread
    # 8 threads, 2 workers: graphs for 1, 7 (full load) and 8.
    cores = CoreShare(threads=8, workers=2, counts=(1, 7, 8))
    assert cores.take(0, behind=1) == 7
    assert cores.take(1, behind=1) == 1
    assert cores.free == 0
    assert CoreShare(threads=4, workers=4).counts == (1, 2, 3, 4)  # eager: any count


@pytest.mark.parametrize("counts", [(2, 4), (1, 5)])
def test_thread_counts_without_one_or_above_the_threads_are_refused(
    counts: tuple[int, ...],
) -> None:
    with pytest.raises(ValueError, match="need 1, and none above 4"):
        CoreShare(threads=4, workers=2, counts=counts)


@pytest.mark.parametrize(("threads", "workers"), [(1, 2), (4, 0), (2, 3)])
def test_invalid_shares_are_refused(threads: int, workers: int) -> None:
    with pytest.raises(ValueError, match="workers cannot share"):
        CoreShare(threads, workers)


def test_taking_twice_or_giving_back_nothing_is_an_error() -> None:
    cores = CoreShare(threads=2, workers=2)
    cores.take(0, behind=1)
    with pytest.raises(ValueError, match="already running"):
        cores.take(0, behind=1)
    with pytest.raises(ValueError, match="not running"):
        cores.give(1)


def load(model: Path, **overrides: object) -> CoreShare | None:
    """The CoreShare a load with these settings gives (no warm-up forwards)."""
    settings = {"model": model, "warmup": False, "batch_overhead_tokens": 0, **overrides}
    return load_model(Settings.model_validate(settings)).cores


@pytest.mark.usefixtures("restore_torch_threads")
def test_the_loader_runs_a_forward_per_torch_thread_on_a_cpu_by_default(
    gpt2_rm: Path,
) -> None:
    cores = load(gpt2_rm, torch_threads=2, device="cpu")
    assert cores is not None and (cores.threads, cores.workers) == (2, 2)
    assert load(gpt2_rm, torch_threads=1, device="cpu") is None  # one thread: one forward
    assert load(gpt2_rm, torch_threads=2, device="cpu", model_workers=1) is None
    cores = load(gpt2_rm, torch_threads=4, device="cpu", model_workers=3)
    assert cores is not None and (cores.threads, cores.workers) == (4, 3)


@pytest.mark.usefixtures("restore_torch_threads")
def test_more_workers_than_threads_is_a_load_error(gpt2_rm: Path) -> None:
    with pytest.raises(LoadError, match="model_workers 3 exceeds the 2 torch threads"):
        load(gpt2_rm, torch_threads=2, device="cpu", model_workers=3)
