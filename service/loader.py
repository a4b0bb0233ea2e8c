"""Model directory -> a loaded backend, its encoder and its identity (id, fingerprint, manifest).

Then the warm-up (`budget.calibrate`), which sizes batches for this model on this device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

from merger.calibration import CALIBRATION_NAME, Calibration, read_calibration
from merger.checkpoints import TOKENIZER_FILES
from merger.errors import MergeError, VerifyError
from merger.hashing import sha256_file
from merger.manifest import MANIFEST_NAME, compute_fingerprint, read_manifest
from merger.scoring import filler_id, resolve_device
from service.backends.base import Backend, OutOfMemory
from service.backends.transformers import CompileError, TransformersBackend
from service.budget import calibrate
from service.cores import CoreShare
from service.default_model import default_model
from service.device import DevicePlan, Target, device_plan
from service.encoding import Encoder
from service.settings import Settings

log = logging.getLogger(__name__)

NO_MODEL = (
    "no model given: pass --model DIR (or set WARM_MODEL) to a WARM artifact made by "
    "`warm-merge build` or to a Hugging Face *ForSequenceClassification directory. "
    "The embedded default, the demo's WARM reward model, is not built yet at {default}: "
    "`make demo` (or `python -m merger.recipe.demo`) builds it once, in minutes on a CPU"
)
DEFAULT_MODEL_ID = "warm-demo"


class LoadError(Exception):
    """The model directory cannot be served; the message says why."""


@dataclass
class LoadedModel:
    """Everything the API needs to know about and do with the served model."""

    model_id: str
    fingerprint: str
    manifest: dict[str, Any] | None
    backend: Backend
    encoder: Encoder
    overhead_tokens: float
    batch_size: int  # most items in one forward (the device plan's)
    batch_tokens: int
    cores: CoreShare | None = None  # forwards run side by side on a CPU, sharing its threads
    labels: tuple[str, ...] = ("LABEL_0",)  # the config's id2label, one name per output
    problem_type: str | None = None  # the config's: decides the activation APIs apply
    calibration: Calibration | None = None  # the artifact's (warm-merge calibrate)
    tf32: bool = False  # fp32 matrix products run in TF32 (device.DevicePlan.tf32)

    def names(self, served: list[str], model_arg: Path | None) -> tuple[str, ...]:
        """The names a request's `model` field may carry: --served-model-name, else the model
        id and the model path as given (vLLM accepts its --model path)."""
        if served:
            return tuple(served)
        return (self.model_id, *([str(model_arg)] if model_arg is not None else []))


def resolve_model(model: Path | None) -> Path:
    """The directory to serve: `model`, or the embedded default (the `make demo` artifact)."""
    if model is not None:
        return check_model_dir(model)
    default = default_model()
    if not (default / MANIFEST_NAME).is_file():
        raise LoadError(NO_MODEL.format(default=default))
    return check_model_dir(default)


def check_model_dir(model: Path) -> Path:
    """The model directory, or a LoadError saying what is wrong with it."""
    if not model.is_dir():
        raise LoadError(f"{model}: not a directory")
    if not (model / "config.json").is_file():
        raise LoadError(f"{model}: no config.json (expected a Hugging Face model directory)")
    if not any(model.glob("*.safetensors")):
        raise LoadError(
            f"{model}: no *.safetensors weights (pickled checkpoints are never loaded; "
            "convert with save_pretrained(..., safe_serialization=True))"
        )
    return model


def identity(model_dir: Path) -> tuple[str, dict[str, Any] | None]:
    """The fingerprint and merge record of a WARM artifact, or a fingerprint of the files."""
    if (model_dir / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(model_dir)
        except VerifyError as error:
            raise LoadError(str(error)) from error
        return manifest.fingerprint, manifest.merge.model_dump(mode="json")
    names = ["config.json", *TOKENIZER_FILES, "model.safetensors.index.json"]
    files = [model_dir / n for n in names if (model_dir / n).is_file()]
    files += sorted(model_dir.glob("*.safetensors"))
    return compute_fingerprint({f.name: sha256_file(f) for f in files}), None


def calibration_of(model_dir: Path) -> Calibration | None:
    """The artifact's calibration, checked against the SHA-256 its manifest lists (None: no
    manifest, or no calibration listed); a LoadError if it is changed or invalid."""
    path = model_dir / CALIBRATION_NAME
    if not (model_dir / MANIFEST_NAME).is_file():
        return None
    try:
        listed = read_manifest(model_dir).files.get(CALIBRATION_NAME)
    except MergeError as error:
        raise LoadError(str(error)) from error
    if listed is None:
        if path.is_file():  # a calibration interrupted before the manifest listed it
            log.warning("%s: not listed in the manifest, ignored (calibrate again)", path)
        return None
    try:
        return read_calibration(model_dir, listed)
    except MergeError as error:
        raise LoadError(f"{error} (calibrate again, or see warm-merge verify)") from error


def model_limit(tokenizer: Any, config: Any) -> int | None:
    """The longest input the model takes, from its config or tokenizer (None if unknown)."""
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits.append(tokenizer.model_max_length)
    known = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(known) if known else None


def load_model(settings: Settings) -> LoadedModel:
    """Load, check and warm up the model the settings name (blocking; call from a thread)."""
    model_dir = resolve_model(settings.model)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    code = settings.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=code)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=code)
    except (OSError, ValueError) as error:
        raise LoadError(f"{model_dir}: cannot load config or tokenizer: {error}") from error
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LoadError(
            f"{model_dir}: architecture {architectures} is not a *ForSequenceClassification "
            "reward model"
        )
    if settings.reward_index >= config.num_labels:
        raise LoadError(
            f"reward_index {settings.reward_index} but the model has {config.num_labels} outputs"
        )
    try:
        device = resolve_device(settings.device)
    except ValueError as error:
        raise LoadError(str(error)) from error
    plan = device_plan(Target.probe(device), config, settings)
    if device.type == "cuda":  # process-wide switches: this process serves one model
        torch.backends.cuda.matmul.allow_tf32 = plan.tf32
        torch.backends.cudnn.allow_tf32 = plan.tf32
    limit = model_limit(tokenizer, config)
    max_length = settings.max_length or limit or 512
    if limit is not None and max_length > limit:
        raise LoadError(f"max_length {max_length} exceeds the model's limit of {limit} tokens")
    max_length = min(max_length, plan.max_batch_tokens)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    try:
        encoder = Encoder(
            tokenizer, max_length=max_length, separator=settings.separator, vocab_size=vocab
        )
    except ValueError as error:
        raise LoadError(f"{model_dir}: {error}") from error
    pad = filler_id(tokenizer.pad_token_id, config.pad_token_id, tokenizer.eos_token_id)
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)  # process-wide; only this thread runs torch
    fingerprint, manifest = identity(model_dir)
    calibration = calibration_of(model_dir)
    if calibration is not None and calibration.output != settings.reward_index:
        raise LoadError(
            f"reward_index {settings.reward_index}: {model_dir}'s calibration describes output "
            f"{calibration.output} (serve that output, or leave the calibration out)"
        )
    if calibration is None and settings.normalize != "none":
        raise LoadError(
            f"normalize {settings.normalize!r}: {model_dir} has no calibration "
            "(run `warm-merge calibrate` on the artifact)"
        )
    cores = core_share(settings, plan.share_cores)
    threads = cores.counts if cores else (torch.get_num_threads(),)
    backend = make_backend(
        settings, model_dir, config, plan, max_length=max_length, pad=int(pad), threads=threads
    )
    overhead, budget = settings.batch_overhead_tokens, plan.max_batch_tokens
    if settings.continuous:  # vLLM's scheduler forms the batches: nothing to calibrate
        overhead = overhead or 0.0
    elif settings.warmup or overhead is None:
        # Under load, side-by-side forwards run on one thread each: time batches as they run.
        beside = cores is not None and cores.workers == cores.threads
        try:
            measured = calibrate(
                backend,
                encoder,
                plan.max_batch_size,
                plan.max_batch_tokens,
                threads=1 if beside else None,
            )
        except OutOfMemory as error:
            backend.close()
            raise LoadError(f"{model_dir}: warm-up: {error}") from error
        overhead = measured.overhead_tokens if overhead is None else overhead
        budget = measured.batch_tokens if settings.tune_batch_tokens else budget
    id2label = getattr(config, "id2label", None) or {}
    labels = tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels))
    return LoadedModel(
        labels=labels,
        problem_type=getattr(config, "problem_type", None),
        model_id=settings.model_id
        or next(iter(settings.served_model_name), None)
        or (model_dir.resolve().name if settings.model else DEFAULT_MODEL_ID),
        fingerprint=fingerprint,
        manifest=manifest,
        backend=backend,
        encoder=encoder,
        overhead_tokens=overhead,
        batch_size=plan.max_batch_size,
        batch_tokens=budget,
        cores=cores,
        calibration=calibration,
        tf32=plan.tf32,
    )


def core_share(settings: Settings, share: bool) -> CoreShare | None:
    """How many forwards run at once and on which threads (None: one at a time).

    Forwards run side by side only where the device plan `share`s the cores (the
    transformers backend on a CPU); call from the thread that loads the model (torch's
    thread count is per thread). A compiled model runs its forwards on the few thread
    counts its graphs are compiled for (`CoreShare`).
    """
    workers = settings.model_workers
    if not share:
        if workers is not None and workers > 1:
            raise LoadError(f"model_workers {workers}: forwards run side by side on a CPU only")
        return None
    threads = torch.get_num_threads()
    if workers is None:
        workers = threads
    if workers > threads:
        raise LoadError(
            f"model_workers {workers} exceeds the {threads} torch threads (set torch_threads)"
        )
    if workers == 1:
        return None
    # A compiled model has graphs for these counts only: a lone batch, full load, one.
    counts = (1, threads - workers + 1, threads) if settings.compile else None
    return CoreShare(threads, workers, counts=counts)


def make_backend(
    settings: Settings,
    model_dir: Path,
    config: Any,
    plan: DevicePlan,
    *,
    max_length: int,
    pad: int,
    threads: tuple[int, ...] = (),
) -> Backend:
    """The backend the settings name, holding the model; `threads`: the CPU thread counts
    its forwards may run on (a compiled model compiles its graphs for each)."""
    if settings.backend == "transformers":
        try:
            return TransformersBackend(
                model_dir,
                device=settings.device,
                dtype=settings.dtype,
                max_length=max_length,
                pad_token_id=pad,
                trust_remote_code=settings.trust_remote_code,
                compile=settings.compile,
                compile_threads=threads,
            )
        except CompileError as error:
            raise LoadError(str(error)) from error
    from service.backends.vllm import VLLMBackend  # imports vllm: only when asked for

    try:
        return VLLMBackend(
            model_dir,
            device=settings.device,
            dtype=settings.dtype,
            max_length=max_length,
            trust_remote_code=settings.trust_remote_code,
            config=config,
            tensor_parallel_size=settings.vllm_tensor_parallel_size,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            kv_cache_gib=settings.vllm_kv_cache_gib,
            enable_prefix_caching=settings.vllm_enable_prefix_caching,
            enforce_eager=settings.vllm_enforce_eager,
            max_num_batched_tokens=plan.engine_max_num_batched_tokens,
            max_num_seqs=plan.engine_max_num_seqs,
        )
    except (ImportError, ValueError) as error:
        raise LoadError(str(error)) from error
