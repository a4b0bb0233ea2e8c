"""How concurrent forward passes share the CPU's torch threads.

On a CPU, one forward pass over two threads is not twice as fast as over one: its OpenMP
team meets at a barrier after every operator, so whenever the HTTP front, the tokeniser or
the OS takes one core for a moment, the other cores wait. Forwards on one thread each never
wait for each other, and score more items per second under load. A lone item, though,
finishes sooner on every thread.

So worker 0, the primary, takes every batch it can: with little queued behind the batch it
takes every free thread; with more batches queued behind it, every free thread but one for
each idle side worker that one of those batches could keep busy. The side workers take a batch only
while the primary is running one, and always on one thread. A forward starts only on a free
thread, so the cores are never oversubscribed; and only the primary ever runs an OpenMP
team of several threads (with two such teams, the lone forwards of a 2-core machine took
twice as long). The batcher, for its part, splits work that fits one batch into a piece
per free thread when there are as many workers as threads (`Batcher._pieces`).

A compiled model has graphs for given thread counts only (dynamo guards on the thread
count), so with `counts` a forward's threads are rounded down to one of them: for a compiled
model, every thread (a lone batch), every thread but one per side worker (full load) and one.
"""

from __future__ import annotations


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

    def give(self, worker: int) -> int:
        """`worker`'s forward is done; returns the threads it had."""
        threads, self.running[worker] = self.running[worker], 0
        if not threads:
            raise ValueError(f"worker {worker} is not running a forward")
        self.free += threads
        return threads
