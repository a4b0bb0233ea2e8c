"""Per-thread CPU accounting: what the service's roles burnt, by thread."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from service import metrics
from service.metrics import ThreadCPU, ThreadStat, read_thread_stat

# --- thread CPU -----------------------------------------------------------------------


def burn_cpu(seconds: float) -> None:
    """Spin until this thread has used `seconds` of CPU."""
    while time.thread_time() < seconds:
        pass


def test_read_thread_stat_reads_the_threads_own_clock() -> None:
    tick = 1 / os.sysconf("SC_CLK_TCK")
    burn_cpu(0.2)
    before = time.thread_time()
    stat = read_thread_stat(threading.get_native_id())
    after = time.thread_time()
    # /proc rounds user and system time down to ticks, and may lag by a scheduler tick.
    assert before - 3 * tick <= stat.cpu_seconds <= after
    assert read_thread_stat(threading.get_native_id()).started == stat.started


def wait_gone(thread: threading.Thread) -> None:
    """Join `thread` and wait for the OS to remove it (join returns a little before)."""
    thread.join()
    deadline = time.monotonic() + 10
    while Path(f"/proc/self/task/{thread.native_id}").exists():
        assert time.monotonic() < deadline, "the thread never left /proc"
        time.sleep(0.01)


def test_thread_cpu_sums_roles_and_never_falls_when_a_thread_ends() -> None:
    cpu = ThreadCPU()
    burnt = threading.Barrier(4)
    end = [threading.Event() for _ in range(3)]

    def worker(role: str, seconds: float, k: int) -> None:
        cpu.register(role)
        cpu.register(role)  # again, same role: nothing changes
        burn_cpu(seconds)
        burnt.wait()
        end[k].wait()

    jobs = (("model", 0.2), ("model", 0.1), ("tokenizer", 0.1))
    threads = [threading.Thread(target=worker, args=(*job, k)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    burnt.wait()
    live = totals(cpu)
    assert live["model"] == pytest.approx(0.3, abs=0.05)  # two threads: 0.2 + 0.1
    assert live["tokenizer"] == pytest.approx(0.1, abs=0.05)
    end[0].set()  # one model thread ends: what it used stays counted
    wait_gone(threads[0])
    assert totals(cpu)["model"] >= live["model"]
    for e, t in zip(end, threads, strict=True):
        e.set()
        wait_gone(t)
    assert totals(cpu) == pytest.approx(live, abs=0.03)  # every thread gone: last readings


def totals(cpu: ThreadCPU) -> dict[str, float]:
    return {s.labels["role"]: s.value for f in cpu.collect() for s in f.samples}


def test_thread_cpu_refuses_a_second_role_and_ignores_a_reused_thread_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = ThreadCPU()
    # What /proc says at each call: two registrations, then two scrapes.
    stats = [ThreadStat(0.0, 100), ThreadStat(0.1, 100), ThreadStat(5.0, 100), ThreadStat(7.0, 200)]
    readings = iter(stats)
    monkeypatch.setattr(metrics, "read_thread_stat", lambda tid: next(readings))
    cpu.register("event_loop")  # started at tick 100
    with pytest.raises(ValueError, match="already counted as event_loop"):
        cpu.register("model")
    assert totals(cpu) == {"event_loop": 5.0}
    # The id now names another thread (started at tick 200, used 7 s): not counted.
    assert totals(cpu) == {"event_loop": 5.0}


def test_thread_cpu_is_empty_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(tid: int) -> ThreadStat:
        raise FileNotFoundError(f"/proc/self/task/{tid}/stat")

    monkeypatch.setattr(metrics, "read_thread_stat", no_proc)
    cpu = ThreadCPU()
    cpu.register("event_loop")
    assert totals(cpu) == {}
