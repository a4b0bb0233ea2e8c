"""The transformers backend on the device of `--device` (CPU here; CUDA in `make gpu-check`):
the model's own rewards in fp32 and bf16, alone or batched, under an fp32 head.

Each test compares the service's forward with transformers' own forward of one unpadded
item (fp32, on the same device), to the tolerance of the trunk's dtype (`on_device`).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from on_device import assert_rewards_agree
from tiny_models import EOS_ID, make_rm

from merger.scoring import load_reward_model, reward_head
from service.backends.transformers import TransformersBackend

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def no_pad_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny Llama RM with no pad token (padded with EOS, as Llama-3 RMs are)."""
    out = tmp_path_factory.mktemp("no_pad_llama")
    return make_rm(
        out,
        "llama",
        seed=21,
        tokenizer_dir=tiny_tokenizer_dir,
        config_overrides={"pad_token_id": None, "initializer_range": 0.2},
    )


@pytest.fixture(scope="module")
def items() -> list[list[int]]:
    """24 items of 3-40 token ids, EOS-terminated (EOS is also the filler)."""
    rng = random.Random(4)
    return [
        [rng.randrange(5, 290) for _ in range(rng.randint(2, 39))] + [EOS_ID] for _ in range(24)
    ]


def direct(model_dir: Path, items: list[list[int]], device: torch.device) -> list[float]:
    """transformers' own fp32 forward of each item alone, on `device`."""
    model = load_reward_model(model_dir).to(device)
    with torch.inference_mode():
        return [
            float(model(input_ids=torch.tensor([ids], device=device)).logits[0, 0]) for ids in items
        ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_served_rewards_are_the_models_own_alone_or_batched(
    no_pad_llama: Path, items: list[list[int]], device: torch.device, dtype: str
) -> None:
    backend = TransformersBackend(
        no_pad_llama,
        device=str(device),
        dtype=dtype,
        max_length=64,
        pad_token_id=EOS_ID,
        trust_remote_code=False,
    )
    model = backend.model.model
    head = reward_head(model)
    assert head is not None and head.weight.dtype is torch.float32  # type: ignore[union-attr]
    assert next(model.base_model.parameters()).dtype is getattr(torch, dtype)
    assert head.weight.device.type == device.type  # type: ignore[union-attr]
    assert backend.info.dtype == dtype and backend.info.head_dtype == "float32"
    want = direct(no_pad_llama, items, device)
    batched = [float(r) for r in backend.forward(items)[:, 0]]
    alone = [float(backend.forward([ids])[0, 0]) for ids in items]
    backend.close()
    assert_rewards_agree(batched, want, dtype)
    assert_rewards_agree(alone, want, dtype)
    assert_rewards_agree(batched, alone, dtype)
    if dtype == "bfloat16":  # the trunk really ran in 16 bits
        assert batched != pytest.approx(want, abs=1e-6)
