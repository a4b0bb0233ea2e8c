"""Where the reward forward runs: the trunk in its dtype, the reward head in fp32."""

from __future__ import annotations

import torch
from torch import nn

from merger.scoring import place, reward_head


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
