"""The device policy, run on a CPU for CUDA devices described by hand."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from merger.scoring import resolve_device
from service.backends.transformers import TransformersBackend
from service.backends.vllm import engine_limits
from service.device import Target, device_plan, trunk_dtype
from service.loader import core_share
from service.settings import Settings

CPU = Target(torch.device("cpu"))
H100 = Target(torch.device("cuda:0"), capability=(9, 0), memory_bytes=80 << 30)
L4 = Target(torch.device("cuda:0"), capability=(8, 9), memory_bytes=24 << 30)
V100 = Target(torch.device("cuda:0"), capability=(7, 0), memory_bytes=32 << 30)


def config(dtype: str | None) -> SimpleNamespace:
    return SimpleNamespace(torch_dtype=dtype)


@pytest.mark.parametrize(
    ("target", "saved", "expected"),
    [
        (CPU, "bfloat16", torch.float32),  # 16-bit is slower on a CPU
        (H100, "bfloat16", torch.bfloat16),
        (H100, "float16", torch.float16),
        (H100, "float32", torch.bfloat16),  # a GPU never keeps fp32 because the config says so
        (H100, None, torch.bfloat16),
        (V100, None, torch.float32),  # no native bf16
        (V100, "bfloat16", torch.bfloat16),  # what the checkpoint was trained in
    ],
)
def test_auto_dtype_follows_the_device_then_the_checkpoint(
    target: Target, saved: str | None, expected: torch.dtype
) -> None:
    assert trunk_dtype(target, config(saved), "auto") is expected
    assert trunk_dtype(target, config(saved), "float16") is torch.float16  # asked for: kept


def test_on_a_cpu_the_plan_is_what_the_service_always_did() -> None:
    plan = device_plan(CPU, config(None), Settings())
    assert plan.dtype is torch.float32 and plan.head_dtype is torch.float32
    assert plan.share_cores and not plan.pin_memory and not plan.tf32
    assert plan.compile_freezing and plan.compile_options == {"cpp.threads": 1}
    assert (plan.max_batch_size, plan.max_batch_tokens) == (64, 16384)
    assert plan.engine_max_num_batched_tokens is None


def test_on_a_gpu_batches_grow_and_nothing_cpu_only_runs() -> None:
    plan = device_plan(H100, config("bfloat16"), Settings())
    assert plan.dtype is torch.bfloat16 and plan.head_dtype is torch.float32  # fp32 head
    assert not plan.share_cores and plan.pin_memory
    assert not plan.tf32  # a bf16 trunk; the fp32 head keeps full fp32 products
    assert not plan.compile_freezing and plan.compile_options == {}  # one copy of weights
    assert (plan.max_batch_size, plan.max_batch_tokens) == (512, 65536)
    assert (L4.kind, device_plan(L4, config(None), Settings()).max_batch_tokens) == ("cuda", 32768)
    fp32 = device_plan(H100, config(None), Settings(dtype="float32"))
    assert fp32.tf32  # an fp32 trunk on Ampere or later uses TF32 products
    assert not device_plan(V100, config(None), Settings(dtype="float32")).tf32


def test_limits_the_settings_name_are_kept_on_any_device(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = device_plan(H100, config(None), Settings(max_batch_tokens=4096))
    assert (plan.max_batch_size, plan.max_batch_tokens) == (512, 4096)
    monkeypatch.setenv("WARM_MAX_BATCH_SIZE", "8")  # as Helm sets it
    plan = device_plan(H100, config(None), Settings())
    assert (plan.max_batch_size, plan.max_batch_tokens) == (8, 65536)


def test_vllm_engine_limits_on_a_gpu_only() -> None:
    vllm = Settings(backend="vllm")
    plan = device_plan(H100, config(None), vllm)
    assert (plan.engine_max_num_batched_tokens, plan.engine_max_num_seqs) == (16384, 1024)
    assert device_plan(L4, config(None), vllm).engine_max_num_seqs == 256
    assert device_plan(CPU, config(None), vllm).engine_max_num_batched_tokens is None
    assert not device_plan(CPU, config(None), vllm).share_cores  # vLLM's engine runs it


def test_engine_limits_never_cut_below_one_whole_item() -> None:
    # A pooling request is never split across engine steps: tokens rise to max_length.
    assert engine_limits(8192, 256, 16384) == {"max_num_batched_tokens": 16384, "max_num_seqs": 256}
    assert engine_limits(16384, 1024, 512) == {
        "max_num_batched_tokens": 16384,
        "max_num_seqs": 1024,
    }
    assert engine_limits(None, None, 512) == {}  # vLLM's own defaults


def test_a_cpu_backend_never_pins_host_memory(gpt2_rm: Path) -> None:
    # Pinning needs a GPU; on a CPU a forward copies nothing.
    backend = TransformersBackend(
        gpt2_rm, device="cpu", dtype="auto", max_length=16, pad_token_id=0, trust_remote_code=False
    )
    assert not backend.pin and backend.info.dtype == "float32"
    assert backend.forward([[5, 6, 7]]).shape == (1, 1)


def test_with_cuda_present_auto_plans_for_the_gpu_and_no_cpu_only_branch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the loader computes on a GPU host, with torch told that CUDA is there.
    props = SimpleNamespace(major=9, minor=0, total_memory=80 << 30, name="NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device: props)
    device = resolve_device("auto")
    assert device.type == "cuda"
    plan = device_plan(Target.probe(device), config("float32"), Settings())
    assert Target.probe(device).kind == "cuda-large" and Target.probe(device).ampere
    assert plan.dtype is torch.bfloat16 and not plan.share_cores and plan.pin_memory
    assert not plan.compile_freezing and "cpp.threads" not in plan.compile_options
    assert core_share(Settings(), plan.share_cores) is None  # one forward at a time


class Loaded(Exception):
    """Raised by a patched from_pretrained, with the arguments it was called with."""


def test_on_a_gpu_weights_load_straight_onto_it_in_the_trunk_dtype(
    monkeypatch: pytest.MonkeyPatch, gpt2_rm: Path
) -> None:
    # A full host copy first would not fit the pod's memory limit for a 14B model.
    props = SimpleNamespace(major=9, minor=0, total_memory=80 << 30, name="NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device: props)

    def from_pretrained(*_: object, **kwargs: object) -> None:
        raise Loaded(kwargs)

    monkeypatch.setattr(
        "service.backends.transformers.AutoModelForSequenceClassification.from_pretrained",
        from_pretrained,
    )
    with pytest.raises(Loaded) as loaded:
        TransformersBackend(
            gpt2_rm,
            device="auto",
            dtype="auto",
            max_length=16,
            pad_token_id=0,
            trust_remote_code=False,
        )
    kwargs = loaded.value.args[0]
    assert kwargs["device_map"] == torch.device("cuda")
    assert kwargs["dtype"] is torch.bfloat16  # the fp32 checkpoint's trunk, in bf16
