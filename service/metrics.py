"""Prometheus metrics, all prefixed `warm_`, in a registry owned by one app instance."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
REWARD_BUCKETS = (-20, -10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10, 20)


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.model_info = Gauge(
            "warm_model_info",
            "The served model (value 1).",
            ["model", "fingerprint", "dtype", "device", "backend"],
            registry=r,
        )
        self.self_check = Gauge(
            "warm_self_check", "The startup self-check's result (value 1): passed, failed, warned "
            "(failed under --self-check warn), skipped (no golden set), or off.",
            ["status"], registry=r,
        )  # fmt: skip
        self.self_check_deviation = Gauge(
            "warm_self_check_max_deviation", "The self-check's largest |served - recorded| "
            "reward over the golden set.", registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "warm_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "warm_request_duration_seconds", "Request latency, arrival to response.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokenize_latency = Histogram(
            "warm_tokenize_duration_seconds", "Rendering and tokenisation time per request.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "warm_queue_wait_seconds", "Time an item waits from admission to its forward pass.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_latency = Histogram(
            "warm_inference_duration_seconds",
            "Forward-pass time per batch (vLLM's engine: per request, submission to result).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.forwards = Counter(
            "warm_forwards", "Forward passes by the CPU threads each ran on "
            "('all': the backend's own; on a CPU, 1 of 2 means two forwards ran side by side).",
            ["threads"], registry=r,
        )  # fmt: skip
        self.out_of_memory = Counter(
            "warm_out_of_memory", "Forward passes that ran out of device memory (each batch "
            "is then halved and run again, and the batch budget lowered).", registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "warm_batch_size", "Items per forward pass.", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "warm_batch_tokens", "Padded tokens per forward pass.", buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.padding_ratio = Histogram(
            "warm_batch_padding_ratio", "Share of a batch's padded tokens that are padding.",
            buckets=RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_requests = Gauge(
            "warm_queue_requests", "Requests admitted and not yet answered.", registry=r
        )
        self.queue_depth = Gauge(
            "warm_queue_depth", "Items waiting for a forward pass.", registry=r
        )
        self.queue_tokens = Gauge(
            "warm_queue_tokens", "Tokens admitted and not yet scored.", registry=r
        )
        self.items = Counter("warm_items_scored", "Items scored.", registry=r)
        self.tokens = Counter("warm_tokens_scored", "Tokens scored.", registry=r)
        self.dropped = Counter(
            "warm_items_dropped", "Items dropped before compute, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter("warm_errors", "Error responses by type.", ["type"], registry=r)
        self.rewards = Histogram(
            "warm_reward", "Distribution of served rewards (watch for reward hacking).",
            buckets=REWARD_BUCKETS, registry=r,
        )  # fmt: skip
        self.ready = Gauge("warm_ready", "1 when the model is loaded and warm.", registry=r)
        # The process's CPU seconds, resident memory and open files (Linux; nothing
        # elsewhere): warm_process_cpu_seconds_total against the cores given tells whether
        # a replica is CPU-bound (vLLM's engine, in processes of its own, is not in it).
        ProcessCollector(namespace="warm", registry=r)
        self.thread_cpu = ThreadCPU()
        r.register(self.thread_cpu)


class ThreadCPU(Collector):
    """`warm_thread_cpu_seconds_total{role}`: CPU time of the service's own threads by role.

    The event loop (HTTP, JSON, admission, scheduling), the tokeniser and, with our batcher,
    the model threads each register themselves; each counts its CPU since it started. When
    the event loop and the tokeniser together use about a core, the service is bound by its
    front, not by the model: more replicas help, more model threads do not. Not counted:
    threads the libraries start themselves (torch's OpenMP team, the fast tokenizer's pool
    for requests of several texts, vLLM's engine); `warm_process_cpu_seconds_total` has the
    process's total. Read from /proc (Linux; elsewhere the family is empty), in clock ticks
    (usually 10 ms). A thread that has ended keeps its last reading: the counters never fall.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[tuple[int, int], str] = {}  # (native id, start time) -> role
        self._last: dict[tuple[int, int], float] = {}  # CPU seconds last read

    def register(self, role: str) -> None:
        """Count the calling thread's CPU time (since it started) under `role`.

        Registering again under the same role does nothing; under another, raises.
        """
        tid = threading.get_native_id()
        try:
            key = (tid, read_thread_stat(tid).started)
        except (OSError, ValueError, IndexError):  # no /proc here: nothing to count
            return
        with self._lock:
            if self._threads.setdefault(key, role) != role:
                raise ValueError(f"thread {tid} is already counted as {self._threads[key]}")

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "warm_thread_cpu_seconds",
            "CPU time of the service's threads by role (event_loop, tokenizer; model with "
            "the batcher).",
            labels=["role"],
        )
        totals: dict[str, float] = {}
        with self._lock:
            for key, role in self._threads.items():
                tid, started = key
                try:
                    stat = read_thread_stat(tid)
                except (OSError, ValueError, IndexError):  # the thread has ended
                    stat = None
                if stat is not None and stat.started == started:  # not a reused id
                    self._last[key] = max(self._last.get(key, 0.0), stat.cpu_seconds)
                totals[role] = totals.get(role, 0.0) + self._last.get(key, 0.0)
        for role, seconds in sorted(totals.items()):
            family.add_metric([role], seconds)
        yield family


@dataclass(frozen=True)
class ThreadStat:
    """What /proc tells of one thread of this process."""

    cpu_seconds: float  # user plus system
    started: int  # clock ticks after boot: with the id, names the thread


def read_thread_stat(tid: int) -> ThreadStat:
    """Thread `tid`'s CPU time and start time, from /proc/self/task/TID/stat."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "tid (comm) ": state is field 3
    utime, stime, started = int(fields[11]), int(fields[12]), int(fields[19])  # 14, 15, 22
    return ThreadStat((utime + stime) / os.sysconf("SC_CLK_TCK"), started)
