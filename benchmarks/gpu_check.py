"""GPU check: what a CPU cannot show, measured on the first GPU in minutes.

Run (repo root, on the GPU host, no internet needed):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py [--budget-s 480] [--append]
    .venv/bin/python benchmarks/gpu_check.py --dry-run      # CPU, tiny model, seconds (CI)

Needs beyond the repository: a Python with CUDA torch, transformers, tokenizers,
safetensors, httpx, prometheus-client, rich and typer (the workplace's GPU image has them),
plus the serving stack, carried as wheels where missing (`NEEDS`: fastapi, starlette,
uvicorn, pydantic, pydantic-settings and their own needs, well under 64 MiB). The first
phase checks for all of it and stops at once, naming what is missing.

Phases, each with a time budget, skipped (and recorded so) when the time left is short:
  environment  versions, the device, Python headers and a C compiler (Triton builds its
               launcher with them), vLLM and FlashInfer if importable
  model        a Llama-style reward model built from a config with random bf16 weights
               (~1B parameters on a GPU; tiny in --dry-run), saved with a trained tokenizer
  tests        the suite's device policy and fp32-head tests, and its `gpu` tests on the
               device (`--device cuda`: the backend's rewards in fp32 and bf16, alone and
               batched, against transformers' own forward, to each dtype's tolerance)
  agreement    transformers backend: bf16 against fp32 rewards, and alone against batched
               in bf16, in reward units and relative to the rewards' spread
  overhead     the backend's forward (padding, transfer, fp32 head, readback) against the
               model's own forward on the same batch
  memory       in a fresh process: peak anonymous host memory while loading (weights go
               straight to the device, never whole through the host; the mmapped checkpoint's
               page cache is not counted) and peak device memory of a forward
  oom          a batcher fed far more than fits: each batch out of memory is split and
               retried, nothing lost, the budget lowered (on a GPU capped by
               `set_per_process_memory_fraction`; --dry-run: a backend that refuses batches
               past a token count)
  compile      torch.compile: compile time, device memory next to the eager model's (no
               frozen copy of the weights), eager against compiled forward time and rewards
  vllm         where vLLM is importable: engine start, the head's dtype, bf16 rewards
               against the transformers backend's
  throughput   warm-serve (and warm-serve on vLLM where importable) against the naive
               one-forward-per-request server, closed loop, 1 and 8 items per request at
               C = 1, 8, 64, 256 (--dry-run: C = 1, 4)
--dry-run leaves out compile and vllm (most of a minute each on a CPU); the suite runs
those two phases in-process. The report is written after every phase to <out>/report.md
and, with --append, to benchmarks/RESULTS.md (the section is replaced as it grows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

RESULTS = REPO / "benchmarks" / "RESULTS.md"
# Imported by the service and this script; the GPU image lacks the first five groups.
NEEDS = (
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "httpx",
    "prometheus_client",
    "rich",
    "typer",
)
TEST_FILES = (
    "tests/service/test_device.py",
    "tests/merger/test_scoring.py",
    "tests/service/test_on_device.py",
)


@dataclass(frozen=True)
class Size:
    """The model and load of one run."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    items: int  # texts scored in the agreement and overhead phases
    concurrency: tuple[int, ...]
    window_s: float


GPU = Size(2048, 16, 16, 8, 5632, 32000, 256, (1, 8, 64, 256), 5.0)
DRY = Size(64, 2, 2, 1, 128, 1000, 16, (1, 4), 0.5)  # head size 32, as vLLM's CPU needs


@dataclass
class Check:
    """The run: its budget, where it writes, and what each phase found."""

    dry_run: bool
    budget_s: float
    out: Path
    append: bool
    started: float = field(default_factory=time.monotonic)
    stamp: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"))
    sections: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> Size:
        return DRY if self.dry_run else GPU

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def phase(self, name: str, budget_s: float, run: Callable[[Check], str]) -> None:
        """Run one phase if its budget fits in the time left; record what it found."""
        if self.left() < budget_s:
            self.record(name, f"skipped: {self.left():.0f} s left, {budget_s:.0f} s needed")
            return
        start = time.monotonic()
        try:
            text = run(self)
        except Exception as error:  # one failing phase is a finding, not the end of the run
            text = f"failed: {type(error).__name__}: {error}"
        self.record(name, f"{text}\n\n({time.monotonic() - start:.1f} s)")

    def record(self, name: str, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {name}: {text}", flush=True)
        self.sections.append(f"**{name}**: {text}")
        self.write()

    def write(self) -> None:
        mode = "--dry-run, CPU" if self.dry_run else "GPU"
        title = f"### GPU check ({mode}), {self.stamp} UTC"
        body = "\n\n".join([title, *self.sections]) + "\n"
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.md").write_text(body)
        if self.append:
            text = RESULTS.read_text()
            if title in text:
                text = text[: text.index(title)].rstrip() + "\n"
            RESULTS.write_text(text.rstrip() + "\n\n" + body)


def environment(check: Check) -> str:
    """Versions, device, build tools; stops the run when something it needs is missing."""
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"gpu_check: missing {', '.join(missing)}: carry them as wheels")
    import torch
    import transformers

    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "Python.h": (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
        "cc": shutil.which("cc") or shutil.which("gcc") or "none",
        "vllm": importlib.util.find_spec("vllm") is not None,
        "flashinfer": importlib.util.find_spec("flashinfer") is not None,
    }
    if not check.dry_run:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --dry-run on a CPU)")
        props = torch.cuda.get_device_properties(0)
        facts |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory GiB": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return ", ".join(f"{k} {v}" for k, v in facts.items())


def build_model(check: Check) -> str:
    """A Llama-style RM with random bf16 weights, made on the device, and a tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    s = check.size
    out = check.out / "model"
    words = [f"w{i}" for i in range(4 * s.vocab)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<s>", "</s>", "<unk>", "<pad>"]
    tok.train_from_iterator(
        [" ".join(words[i : i + 64]) for i in range(0, len(words), 64)],
        trainers.BpeTrainer(vocab_size=s.vocab, special_tokens=special, show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=2048,
    )  # fmt: skip
    config = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=2048, num_labels=1, pad_token_id=3, tie_word_embeddings=False,
    )  # fmt: skip
    start = time.perf_counter()
    with torch.device(check.device):
        model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    check.state["model"] = out
    return (
        f"{params / 1e9:.3f} B parameters, built and saved in {time.perf_counter() - start:.1f} s"
    )


def run_tests(check: Check) -> str:
    """The suite's device-independent checks, in this Python."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES]
    argv += ["--device", check.device]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return f"{'passed' if done.returncode == 0 else 'FAILED'}: {last}"


def texts(n: int, seed: int = 0) -> list[list[int]]:
    """`n` token-id sequences of 16-48 ids, seeded."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, 900) for _ in range(rng.randint(16, 48))] for _ in range(n)]


def backend(check: Check, dtype: str, max_length: int = 2048) -> Any:
    from service.backends.transformers import TransformersBackend

    return TransformersBackend(
        check.state["model"], device=check.device, dtype=dtype, max_length=max_length,
        pad_token_id=3, trust_remote_code=False,
    )  # fmt: skip


def agreement(check: Check) -> str:
    """bf16 against fp32, alone against batched (bf16), in reward units."""
    import numpy as np

    ids = texts(check.size.items)
    bf16, fp32 = backend(check, "bfloat16"), backend(check, "float32")
    alone = np.array([bf16.forward([x])[0, 0] for x in ids])
    batched = np.concatenate([bf16.forward(ids[i : i + 8])[:, 0] for i in range(0, len(ids), 8)])
    exact = np.concatenate([fp32.forward(ids[i : i + 8])[:, 0] for i in range(0, len(ids), 8)])
    std = float(np.std(exact)) or 1.0
    bf16_fp32 = float(np.max(np.abs(batched - exact)))
    alone_batched = float(np.max(np.abs(alone - batched)))
    for b in (bf16, fp32):
        b.close()
    return (
        f"{len(ids)} items; reward std (fp32) {std:.3g}; max |bf16 - fp32| {bf16_fp32:.2e} "
        f"({bf16_fp32 / std:.1%} of std); max |alone - batched| in bf16 {alone_batched:.2e} "
        f"({alone_batched / std:.1%})"
    )


def overhead(check: Check) -> str:
    """The backend's forward against the model's own, same batch, median of repeats."""
    import torch

    b = backend(check, "bfloat16")
    ids = texts(check.size.items)[:32]
    width = max(map(len, ids))
    padded = torch.tensor([x + [3] * (width - len(x)) for x in ids], device=check.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=check.device)

    def timed(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(7):
            if check.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if check.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    with torch.inference_mode():

        def model_only() -> Any:
            return b.model.model(input_ids=padded, attention_mask=mask).logits.cpu()

        model = timed(model_only)
        service = timed(lambda: b.forward(ids))
    b.close()
    return (
        f"batch of {len(ids)} (longest {width} tokens): model {model * 1e3:.2f} ms, "
        f"backend {service * 1e3:.2f} ms, ratio {service / model:.3f}"
    )


def anonymous_rss() -> int:
    """Bytes of this process's anonymous resident memory (Linux): what a copy of the weights
    in host memory takes, unlike the page cache of the mmapped checkpoint."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_memory(model: str, device: str) -> None:
    """(Child process of `memory`.) Load the model on `device` in bf16, run one forward of
    16 items of 512 tokens; print the peak anonymous host memory before and while loading
    (sampled every 5 ms; CUDA initialised first), and device memory."""
    import threading

    import torch

    from service.backends.transformers import TransformersBackend

    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)  # the context and libraries, before the baseline
    imported = anonymous_rss()
    peak, done = [imported], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], anonymous_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    b = TransformersBackend(
        Path(model), device=device, dtype="bfloat16", max_length=2048, pad_token_id=3,
        trust_remote_code=False,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    done.set()
    sampler.join()
    loaded = max(peak[0], anonymous_rss())
    weights = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    b.forward([[5 + i % 800 for i in range(512)]] * 16)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    print(json.dumps({"imported": imported, "loaded": loaded, "load_s": load_s,
                      "weights": weights, "peak": peak}))  # fmt: skip


def memory(check: Check) -> str:
    """Peak host memory of loading (no whole host copy) and device memory of a forward."""
    model = check.state["model"]
    code = f"import gpu_check; gpu_check.peak_memory({str(model)!r}, {check.device!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "benchmarks")]))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    gib = 2**30
    text = (
        f"checkpoint {size / gib:.2f} GiB; anonymous host memory {got['imported'] / gib:.2f} "
        f"GiB before loading, peak {got['loaded'] / gib:.2f} GiB while loading "
        f"(+{(got['loaded'] - got['imported']) / size:.0%} of the checkpoint; a host copy of "
        f"the weights: +100%), load {got['load_s']:.1f} s"
    )
    if got["weights"]:
        text += (
            f"; device: weights {got['weights'] / gib:.2f} GiB, peak of a 16 x 512-token "
            f"forward {got['peak'] / gib:.2f} GiB"
        )
    return text


class Refusing:
    """(--dry-run) A backend that runs out of memory past `capacity` padded tokens."""

    def __init__(self, inner: Any, capacity: int) -> None:
        self.inner, self.capacity, self.info = inner, capacity, inner.info

    def forward(self, sequences: Any, threads: int | None = None) -> Any:
        from service.backends.base import OutOfMemory

        if len(sequences) * max(map(len, sequences)) > self.capacity:
            raise OutOfMemory("out of memory (simulated)")
        return self.inner.forward(sequences, threads)

    def failure(self) -> str | None:
        return None

    def free_memory(self) -> None:
        self.inner.free_memory()

    def close(self) -> None:
        self.inner.close()


def out_of_memory(check: Check) -> str:
    """A batcher fed far more than fits: batches split and retried, nothing lost."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from service.admission import QueueLimits
    from service.batcher import Batcher
    from service.batching import BatchLimits
    from service.metrics import Metrics

    b = backend(check, "bfloat16", max_length=64)  # items of 16-48 tokens
    ids = texts(4 * check.size.items, seed=3)
    want = np.concatenate([b.forward(ids[i : i + 8])[:, 0] for i in range(0, len(ids), 8)])
    cuda = check.device == "cuda"
    served: Any = b
    fits = len(ids) // 16
    if cuda:  # room for the weights and twice a batch of 1/16 of the items
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        b.forward(ids[:fits])
        room = base + 2 * (torch.cuda.max_memory_allocated() - base)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(room / total)
    else:
        served = Refusing(b, capacity=2 * fits * 48)

    async def run() -> tuple[list[Any], Batcher]:
        # A large fixed cost per forward: the batcher fills its batches as far as it may.
        budget = len(ids) * 64
        limits = BatchLimits(len(ids), budget, overhead_tokens=float(budget))
        batcher = Batcher(served, limits, QueueLimits(10_000, 10_000_000), Metrics())
        with ThreadPoolExecutor(1) as model_thread:
            await batcher.start(model_thread)
            jobs = [batcher.submit([x], time.monotonic() + 120) for x in ids]
            outs = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
            await batcher.stop(5)
        return outs, batcher

    try:
        outcomes, batcher = asyncio.run(run())
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
        b.close()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    got = np.array([o[0][0] for o in outcomes if not isinstance(o, BaseException)])
    ooms = int(batcher.metrics.out_of_memory._value.get())
    diff = float(np.max(np.abs(got - want))) if len(got) == len(want) else float("nan")
    std = float(np.std(want)) or 1.0
    return (
        f"{len(ids)} one-item requests at once, batch limit {len(ids)} items: "
        f"{ooms} forwards out of memory, {len(failed)} requests lost, budget lowered to "
        f"{batcher.limits.max_batch_tokens} tokens; max |reward - batches of 8| {diff:.2e} "
        f"({diff / std:.1%} of std, bf16)"
    )


def compiled(check: Check) -> str:
    """torch.compile against eager: compile time, device memory, forward time, rewards."""
    import numpy as np
    import torch

    from service.backends.transformers import TransformersBackend

    cuda = check.device == "cuda"
    ids = texts(check.size.items)[:32]
    eager = backend(check, "bfloat16")
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    fast = TransformersBackend(
        check.state["model"], device=check.device, dtype="bfloat16", max_length=2048,
        pad_token_id=3, trust_remote_code=False, compile=True,
    )  # fmt: skip
    compile_s = time.perf_counter() - start
    added = (torch.cuda.memory_allocated() - before) if cuda else 0
    weights = sum(p.numel() * p.element_size() for p in eager.model.parameters())

    def median_s(b: Any) -> float:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            b.forward(ids)
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    e, c = median_s(eager), median_s(fast)
    diff = float(np.max(np.abs(eager.forward(ids) - fast.forward(ids))))
    std = float(np.std(eager.forward(ids)[:, 0])) or 1.0
    eager.close()
    fast.close()
    memory_text = (
        f"; device memory the compiled model added {added / 2**30:.2f} GiB "
        f"(weights {weights / 2**30:.2f} GiB)"
        if cuda
        else ""
    )
    return (
        f"compiled in {compile_s:.1f} s{memory_text}; batch of {len(ids)}: eager "
        f"{e * 1e3:.2f} ms, compiled {c * 1e3:.2f} ms ({e / c:.2f}x); max |compiled - eager| "
        f"{diff:.2e} ({diff / std:.1%} of std, bf16)"
    )


def vllm_agreement(check: Check) -> str:
    """vLLM's engine: start time, head dtype, bf16 rewards against the transformers
    backend's."""
    import numpy as np

    if importlib.util.find_spec("vllm") is None:
        return "vLLM not installed here: not measured"
    from service.loader import load_model
    from service.settings import Settings

    ids = texts(check.size.items)
    # On a CPU (the suite's test of this phase), a small eager engine.
    small = (
        {} if check.device == "cuda" else {"vllm_enforce_eager": True, "vllm_kv_cache_gib": 0.25}
    )
    start = time.perf_counter()
    served = load_model(
        Settings.model_validate({"model": check.state["model"], "backend": "vllm",
                                 "dtype": "bfloat16", "warmup": False,
                                 "batch_overhead_tokens": 0, "max_length": 2048, **small})
    )  # fmt: skip
    start_s = time.perf_counter() - start
    try:
        got = served.backend.forward(ids)[:, 0]
        info = served.backend.info
    finally:
        served.backend.close()
    reference = backend(check, "bfloat16")
    want = reference.forward(ids)[:, 0]
    reference.close()
    diff = float(np.max(np.abs(got - want)))
    std = float(np.std(want)) or 1.0
    return (
        f"engine ready in {start_s:.1f} s; trunk {info.dtype}, head {info.head_dtype}; "
        f"{len(ids)} items: max |vLLM - transformers| {diff:.2e} ({diff / std:.1%} of std)"
    )


def throughput(check: Check) -> str:
    """warm-serve against the naive server, closed loop, items/s per (C, items/request)."""
    import serve_bench as sb

    model = check.state["model"]
    ids = texts(512)
    words = [" ".join(f"w{i % 900}" for i in x) for x in ids]
    wl = sb.Workload("gpu", words, [len(x) for x in ids])
    # serve_bench's children hide GPUs by default (CPU benchmarks): give them back here.
    env = {
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
    }
    warm_serve = [sys.executable, "-m", "service.cli", "--model", str(model), "--dtype",
                  "bfloat16"]  # fmt: skip
    servers = {
        "warm-serve": [*warm_serve, "--device", check.device],
        "naive": [sys.executable, str(REPO / "benchmarks" / "serve_naive.py"), "--model",
                  str(model), "--device", check.device, "--dtype", "bfloat16"],
    }  # fmt: skip
    if importlib.util.find_spec("vllm") is not None and not check.dry_run:
        servers["warm-serve-vllm"] = [*warm_serve, "--backend", "vllm"]
    rows = []
    for name, argv in servers.items():
        port = sb.free_port()
        with sb.server(f"gpu-check-{name}", [*argv, "--port", str(port)], port, env=env) as url:
            for k in (1, 8):
                bodies = sb.make_bodies(wl, k)
                for c in check.size.concurrency:
                    window = check.size.window_s
                    w = sb.run_async(sb.closed_loop(url, bodies, c, window / 4, window))
                    r = sb.summarise(w, server=name, workload="gpu", mode="closed",
                                     concurrency=c, per_request=k)  # fmt: skip
                    rows.append((name, c, k, r.items_per_s, r.p50_s))
    table = {(c, k): {} for _, c, k, _, _ in rows}
    for name, c, k, rate, _ in rows:
        table[c, k][name] = rate
    vllm = "warm-serve-vllm" in servers
    lines = [
        "| C | items/request | warm-serve items/s | naive items/s | ratio |"
        + (" warm-serve on vLLM items/s | ratio |" if vllm else ""),
        "|---|---|---|---|---|" + ("---|---|" if vllm else ""),
    ]
    for (c, k), rates in sorted(table.items()):
        naive = rates.get("naive", 0.0)
        cells = [f"| {c} | {k} |"]
        for name in ("warm-serve", "warm-serve-vllm") if vllm else ("warm-serve",):
            ours = rates.get(name, 0.0)
            ratio = f"{ours / naive:.2f}" if naive else "-"
            cells.append(f" {ours:.1f} |" + (f" {naive:.1f} |" if name == "warm-serve" else ""))
            cells.append(f" {ratio} |")
        lines.append("".join(cells))
    return "\n\n" + "\n".join(lines)


PHASES: list[tuple[str, float, Callable[[Check], str]]] = [
    ("environment", 5, environment),
    ("model", 30, build_model),
    ("tests", 60, run_tests),
    ("agreement", 30, agreement),
    ("overhead", 15, overhead),
    ("memory", 30, memory),
    ("oom", 30, out_of_memory),
    ("compile", 60, compiled),
    ("vllm", 60, vllm_agreement),
    ("throughput", 160, throughput),
]


# Phases --dry-run leaves out, and why: they take most of a minute on a CPU each, and the
# suite runs them in-process (tests/benchmarks/test_gpu_check.py).
DRY_RUN_LEAVES_OUT = {
    "compile": "not run in --dry-run (compiling takes ~40 s on a CPU; the suite runs this phase)",
    "vllm": "not run in --dry-run (a CPU engine starts in ~30 s; the suite runs this phase)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, seconds")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting phases")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / ".work" / "gpu_check")
    parser.add_argument("--append", action="store_true", help="also write to RESULTS.md")
    args = parser.parse_args(argv)
    check = Check(args.dry_run, args.budget_s, args.out, args.append)
    for name, budget_s, run in PHASES:
        if name != "environment" and "model" not in check.state and name != "model":
            check.record(name, "skipped: no model")
            continue
        if args.dry_run and name in DRY_RUN_LEAVES_OUT:
            check.record(name, DRY_RUN_LEAVES_OUT[name])
            continue
        check.phase(name, budget_s * (0.2 if args.dry_run else 1.0), run)
    (args.out / "report.json").write_text(json.dumps({"sections": check.sections}, indent=2))


if __name__ == "__main__":
    main()
