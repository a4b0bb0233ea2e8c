"""Who may start a forward pass, and on how many threads: the batcher's `ForwardSlots`.

`OneForward`: one forward at a time, on the backend's own threads (a GPU; a CPU with one
model worker). `CoreShare`: on a CPU, concurrent forward passes share the torch threads.

On a CPU, one forward pass over two threads is not twice as fast as over one: its OpenMP
team meets at a barrier after every operator, so whenever the HTTP front, the tokeniser or
the OS takes one core for a moment, the other cores wait. Forwards on one thread each never
wait for each other, and score more items per second under load. A lone item, though,
finishes sooner on every thread.

So worker 0, the primary, takes every batch it can: with little queued behind the batch it
takes every free thread; with more batches queued behind it, every free thread but one for
each idle side worker that one of those batches could keep busy. The side workers take a
batch only while the primary is running one, and always on one thread. A forward starts only
on a free thread, so the cores are never oversubscribed; and only the primary ever runs an
OpenMP team of several threads (two such teams wait on each other's barriers). Work that
fits one batch is split into a piece per free thread when there are as many workers as
threads (`CoreShare.pieces`).

A compiled model has graphs for given thread counts only (dynamo guards on the thread
count), so with `counts` a forward's threads are rounded down to one of them: for a compiled
model, every thread (a lone batch), every thread but one per side worker (full load) and one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Grant:
    """A forward's right to run now."""

    threads: int | None  # CPU threads to run on (None: the backend's own)
    share: float  # the fraction of the machine's threads it holds (throughput accounting)


class ForwardSlots(Protocol):
    """Which model worker may start a forward, and on what; the caller holds one lock."""

    @property
    def workers(self) -> int:
        """Model threads that run forwards (worker 0 is the primary)."""
        ...

    def ready_worker(self) -> int | None:
        """A worker that could start a batch now (None: none could)."""
        ...

    def grant(self, worker: int, behind: int) -> Grant | None:
        """Let `worker` start its next forward (None: it must wait for a `release`);
        `behind`: how many batches like this one are queued behind it."""
        ...

    def release(self, worker: int) -> None:
        """`worker`'s forward is done."""
        ...

    def pieces(self) -> int:
        """Into how many forwards side by side work that fits one batch should be split."""
        ...


class OneForward:
    """One forward at a time, on the backend's own threads."""

    workers = 1

    def __init__(self) -> None:
        self._running = False

    def ready_worker(self) -> int | None:
        """Worker 0 while it is idle."""
        return None if self._running else 0

    def grant(self, worker: int, behind: int) -> Grant | None:
        """Every thread the backend uses, whatever is queued."""
        if worker != 0 or self._running:
            raise ValueError(f"worker {worker}: one forward at a time, on worker 0")
        self._running = True
        return Grant(threads=None, share=1.0)

    def release(self, worker: int) -> None:
        """The forward is done."""
        self._running = False

    def pieces(self) -> int:
        """Never split: a lone batch takes every thread."""
        return 1


class CoreShare:
    """Threads handed to concurrent forward passes; not locked: the caller holds one lock."""

    def __init__(
        self, threads: int, workers: int, *, counts: tuple[int, ...] | None = None
    ) -> None:
        """`counts`: the thread counts a forward may run on (None: any; else it includes 1)."""
        if workers < 1 or threads < workers:
            raise ValueError(f"{workers} workers cannot share {threads} threads")
        if counts is not None and (1 not in counts or not all(1 <= c <= threads for c in counts)):
            raise ValueError(f"thread counts {counts}: need 1, and none above {threads}")
        self.threads = threads
        self.workers = workers
        self.counts = tuple(sorted(set(counts))) if counts else tuple(range(1, threads + 1))
        self.free = threads
        self.running = [0] * workers  # threads each worker's forward runs on (0: idle)

    def take(self, worker: int, behind: int) -> int | None:
        """Threads for `worker`'s next forward; None: it must wait for a `give`.

        `behind`: how many batches like this one are queued behind it.
        """
        if self.running[worker]:
            raise ValueError(f"worker {worker} is already running a forward")
        if self.free == 0 or (worker != 0 and not self.running[0]):
            return None
        if worker != 0:
            taken = 1
        elif behind:  # leave a thread to each idle side worker a queued batch could keep busy
            taken = max(1, self.free - min(behind, self.running[1:].count(0)))
        else:
            taken = self.free
        taken = max(c for c in self.counts if c <= taken)
        self.free -= taken
        self.running[worker] = taken
        return taken

    def ready_worker(self) -> int | None:
        """The primary while it is idle (it starts every batch it can); else an idle side
        worker while a thread is free."""
        if not self.running[0]:
            return 0
        idle = [w for w in range(1, self.workers) if not self.running[w]]
        return idle[0] if idle and self.free else None

    def grant(self, worker: int, behind: int) -> Grant | None:
        """`take`, as the batcher asks for it."""
        threads = self.take(worker, behind)
        return None if threads is None else Grant(threads, threads / self.threads)

    def release(self, worker: int) -> None:
        """`give`, as the batcher calls it."""
        self.give(worker)

    def pieces(self) -> int:
        """With as many model workers as threads, one per free thread: pieces on one thread
        each finish sooner together than one batch over those threads. Else 1: a lone batch
        takes the free threads."""
        return max(1, self.free) if self.threads == self.workers else 1

    def give(self, worker: int) -> int:
        """`worker`'s forward is done; returns the threads it had."""
        threads, self.running[worker] = self.running[worker], 0
        if not threads:
            raise ValueError(f"worker {worker} is not running a forward")
        self.free += threads
        return threads
