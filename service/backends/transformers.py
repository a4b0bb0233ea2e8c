"""The transformers backend: `AutoModelForSequenceClassification`, CPU or CUDA.

Batches are right-padded with an attention mask and run through `merger.scoring.RewardForward`:
encoders pool their first token and decoder classifiers (GPT-2, Llama, Qwen, Gemma,
Mistral, ...) read their last real token, found from the attention mask and never from the
pad id, exactly as a direct forward pass over one unpadded item does. Models that cap
their attention logits (Gemma 2) load with the eager attention kernel, which applies it.

With `compile`, the forward runs through `torch.compile` with dynamic shapes and the
weights frozen as constants (on a CPU, Inductor then fuses the elementwise operators and
hands oneDNN pre-packed weights). Dynamo specialises dimensions of size 0 and 1 and guards
on torch's thread count, so a compiled model has two graphs, one batch item and several, for
each thread count its forwards run on (`CoreShare.counts`), all compiled before serving;
batches are padded to at least two tokens, so that no length-1 graph is ever needed, and
any other shape the graphs' guards reject runs eagerly rather than compiling mid-serving.
Inductor's own CPU kernels are compiled for one thread, so compiled forwards can run side
by side as eager ones do (`service/cores.py`); oneDNN's matrix products still take every
thread a forward is given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError
from transformers import AutoConfig, AutoModelForSequenceClassification

from merger.scoring import (
    RewardForward,
    attention_implementation,
    pad_right,
    place,
    resolve_device,
    reward_head,
    saved_head,
)
from service.backends.base import ModelInfo, OutOfMemory
from service.device import (
    HEAD_DTYPE,
    Target,
    compile_settings,
    pins_memory,
    saved_dtype,
    trunk_dtype,
)

log = logging.getLogger(__name__)

# In the message of a CUDA error after which the context cannot run anything again.
DEVICE_ASSERT = "device-side assert"
MIN_COMPILED_LENGTH = 2  # a compiled model never sees a length-1 batch (see the docstring)


class CompileError(Exception):
    """torch.compile could not compile the model (no C++ compiler, an unsupported operator)."""


def compile_model(model: RewardForward, target: Target) -> Callable[..., Any]:
    """`model` through torch.compile with dynamic shapes, as `compile_settings` has it for
    `target`: on a CPU, weights frozen as constants and Inductor's C++ kernels on one thread.

    Freezing (constants folded, weights pre-packed for oneDNN on a CPU; inference only)
    is switched on process-wide: Inductor reads it whenever it compiles a graph, and
    torch.compile's `options` do not reach it; most of the compiled speed-up comes from it.
    Inductor's kernels otherwise keep the OpenMP thread count of the compiling thread, and
    two forwards side by side would oversubscribe the cores; on one thread they lose
    nothing, since the matrix products (oneDNN) still use the forward's threads. Figures:
    benchmarks/RESULTS.md, "Design measurements".
    """
    freezing, options = compile_settings(target)
    inductor_config.freezing = freezing
    return torch.compile(model, dynamic=True, options=options)


class StanceHold:
    """Dynamo's stance while compiled forwards run.

    `torch.compiler.set_stance` is process-wide, not per thread. Forwards side by side
    share one hold: the first to start sets the stance and the last to finish restores the
    one before (each restoring its own prior would leave the other forward running under
    the wrong stance, and the stance set after both had finished).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._stance: str | None = None
        self._setting: Any = None  # the set_stance object that restores the prior stance

    @contextmanager
    def hold(self, stance: str) -> Iterator[None]:
        """Run the body under `stance`; another stance while one is held is an error."""
        with self._lock:
            if self._holders == 0:
                self._setting = torch.compiler.set_stance(stance)
                self._stance = stance
            elif stance != self._stance:
                raise RuntimeError(f"stance {stance!r} asked while {self._stance!r} is held")
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._setting.__exit__(None, None, None)
                    self._setting = self._stance = None


STANCE = StanceHold()


def compile_failure(error: Exception) -> CompileError:
    """One line: what failed ('Type: first line', from inside dynamo's wrappers), and a hint
    about the toolchain only where the compiler backend itself failed."""
    cause = getattr(error, "inner_exception", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    what = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    if isinstance(error, BackendCompilerFailed | InductorError):
        return CompileError(
            f"compile: torch.compile failed ({what}); serve without compile, or install a "
            "C++ compiler (CPU) or Triton (CUDA)"
        )
    return CompileError(f"compile: the first compiled forward failed ({what})")


class TransformersBackend:
    """A sequence-classification model held on one device for inference."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str,
        dtype: str,
        max_length: int,
        pad_token_id: int,
        trust_remote_code: bool,
        compile: bool = False,
        compile_threads: Sequence[int] = (),
    ) -> None:
        """`compile_threads`: the CPU thread counts forwards will run on, a pair of graphs
        compiled for each (default: the calling thread's)."""
        self.device = resolve_device(device)
        target = Target.probe(self.device)
        self.pin = pins_memory(target)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        torch_dtype = trunk_dtype(target, config, dtype)
        # Straight onto the device in the trunk's dtype, shard by shard: a model never sits
        # whole in host memory (a 14B bf16 model would not fit the pod's memory limit).
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=torch_dtype,
            device_map=self.device,
            attn_implementation=attention_implementation(config),
        )
        # The head's weights as saved: loading in the trunk's dtype has rounded them.
        saved = saved_head(model_dir, model) if torch_dtype != HEAD_DTYPE else None
        rounded = saved_dtype(config) not in (torch_dtype, None)
        if (
            saved is None
            and rounded
            and torch_dtype != HEAD_DTYPE
            and reward_head(model) is not None
        ):
            log.warning(
                "%s: the reward head's tensors are not in the checkpoint under the model's "
                "names; its weights are rounded to %s",
                model_dir,
                torch_dtype,
            )
        # Models RewardForward does not pool itself (remote code with other heads) pool
        # through the pad id: give them one (composite configs read their text config's).
        model.config.pad_token_id = pad_token_id
        model.config.get_text_config().pad_token_id = pad_token_id
        self.model = RewardForward(place(model, self.device, torch_dtype, HEAD_DTYPE, saved).eval())
        self.pad_token_id = pad_token_id
        self._failure: str | None = None
        self.run: Callable[..., Any] = self.model
        self.min_length = 1
        # Dynamo's stance for forwards (None: not compiled, or compiling). Once the graphs
        # exist, a shape none covers runs eagerly instead of holding every queued request
        # behind a compile of tens of seconds; tests set "fail_on_recompile".
        self.stance: str | None = None
        if compile:
            self.run = compile_model(self.model, target)
            self.min_length = MIN_COMPILED_LENGTH
            self._compile_now(compile_threads or (torch.get_num_threads(),))
            self.stance = "eager_on_recompile"
        self.info = ModelInfo(
            architecture=type(model).__name__,
            num_labels=int(model.config.num_labels),
            dtype=str(torch_dtype).removeprefix("torch."),
            device=str(self.device),
            max_length=max_length,
            backend="transformers",
            compiled=compile,
            # Remote code with a head of another name runs it in the trunk's dtype.
            head_dtype=str(
                HEAD_DTYPE if reward_head(model) is not None else torch_dtype
            ).removeprefix("torch."),
        )

    def _compile_now(self, thread_counts: Sequence[int]) -> None:
        """Compile both graphs (one item; several) for each thread count, before serving.

        Sizes that differ (3 items of 2 tokens) keep dynamo from tying the batch and length
        dimensions to one symbol, which a later batch of other sizes would have to recompile.
        Dynamo guards on torch's thread count, so a forward on a count no graph was compiled
        for would compile (or, once serving, run eagerly).
        """
        ids = [self.pad_token_id] * MIN_COMPILED_LENGTH
        counts = sorted(set(thread_counts))
        restore = torch.get_num_threads()
        started = time.perf_counter()
        try:
            for threads in counts:
                self.forward([ids], threads=threads)
                self.forward([ids] * (MIN_COMPILED_LENGTH + 1), threads=threads)
        except Exception as error:  # Inductor raises many kinds: one line names the cause
            raise compile_failure(error) from error
        finally:
            torch.set_num_threads(restore)
        log.info(
            "torch.compile: graphs for %s thread(s) compiled in %.1f s",
            " and ".join(map(str, counts)),
            time.perf_counter() - started,
        )

    @torch.inference_mode()
    def forward(self, sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        """Logits (n, num_labels) of one right-padded batch, on `threads` CPU threads."""
        if threads is not None and torch.get_num_threads() != threads:
            # OpenMP's thread count is per calling thread: other model threads keep theirs.
            torch.set_num_threads(threads)
        ids, mask = pad_right(sequences, self.pad_token_id, self.min_length)
        try:
            with nullcontext() if self.stance is None else STANCE.hold(self.stance):
                logits = self.run(
                    input_ids=self._to_device(ids), attention_mask=self._to_device(mask)
                )
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(str(error).splitlines()[0]) from error
        except RuntimeError as error:
            if DEVICE_ASSERT in str(error):  # the CUDA context is unusable from now on
                self._failure = f"the device failed for good: {str(error).splitlines()[0]}"
            raise
        outputs: np.ndarray = logits.to(torch.float64).cpu().numpy()
        return outputs

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the model's device (pinned first on a GPU: an asynchronous copy)."""
        tensor = torch.from_numpy(array)
        if self.pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def failure(self) -> str | None:
        """Set once a device-side assert broke the CUDA context (every later forward would
        fail); any other failing forward fails its batch only."""
        return self._failure

    def free_memory(self) -> None:
        """Return the CUDA caching allocator's unused blocks (nothing to do on a CPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the model and return cached device memory."""
        del self.model, self.run
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
