"""Where the reward forward runs: the trunk in its dtype, the reward head in fp32."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from merger.scoring import place, reward_head, saved_head


class TinyRM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.score = nn.Linear(4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.score(self.trunk(x))
        return out


def test_the_head_keeps_its_loaded_weights_in_fp32_and_casts_its_inputs() -> None:
    torch.manual_seed(0)
    model = TinyRM()
    loaded = model.score.weight.detach().clone()
    assert reward_head(model) is model.score
    place(model, torch.device("cpu"), torch.bfloat16, torch.float32)
    assert model.trunk.weight.dtype is torch.bfloat16
    assert model.score.weight.dtype is torch.float32
    assert torch.equal(model.score.weight, loaded)  # not rounded through bf16 on the way
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype is torch.float32
    assert torch.equal(out, model.trunk(x).float() @ loaded.T)  # bf16 hidden, fp32 head


def test_one_dtype_for_both_moves_the_model_as_it_is() -> None:
    model = place(TinyRM(), torch.device("cpu"), torch.float32, torch.float32)
    assert model.score.weight.dtype is torch.float32 and not model.score._forward_pre_hooks
    assert reward_head(nn.Linear(2, 2)) is None


def test_a_model_loaded_in_bf16_gets_its_head_back_from_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = TinyRM()
    # Two shards, as a sharded checkpoint has them: the head is read from wherever it is.
    save_file(
        {"trunk.weight": saved.trunk.weight, "trunk.bias": saved.trunk.bias},
        tmp_path / "a.safetensors",
    )
    save_file({"score.weight": saved.score.weight.detach()}, tmp_path / "b.safetensors")
    model = TinyRM().to(torch.bfloat16)  # as loaded straight in the trunk's dtype
    model.load_state_dict(saved.state_dict())
    head = saved_head(tmp_path, model)
    assert head is not None and head["weight"].dtype is torch.float32
    place(model, torch.device("cpu"), torch.bfloat16, torch.float32, head)
    assert torch.equal(model.score.weight, saved.score.weight)  # the fp32 weights as saved
    assert not torch.equal(model.score.weight, saved.score.weight.bfloat16().float())


def test_a_head_the_checkpoint_does_not_name_is_not_guessed(tmp_path: Path) -> None:
    save_file({"head.weight": torch.zeros(1, 4)}, tmp_path / "model.safetensors")
    assert saved_head(tmp_path, TinyRM()) is None  # no `score.weight`
    assert saved_head(tmp_path, nn.Linear(2, 2)) is None  # no known head at all
