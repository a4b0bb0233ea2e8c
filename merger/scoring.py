"""A reward model's forward pass: token ids and attention mask in, the reward head's outputs out.

Decoder reward models (GPT-2, Llama, Qwen, Gemma, Mistral `*ForSequenceClassification`)
read their reward at the last real token. Transformers finds that token as the rightmost
one that differs from the pad id, which goes wrong whenever the pad id also occurs as a
real token: a Llama-3 or Mistral RM without a pad token is padded with EOS, and the EOS
(`<|eot_id|>`, `</s>`) that their chat templates end every chat with is then skipped.
Here the last position comes from the attention mask only, with left or right padding,
whatever the pad id. Encoders (BERT, ...) pool their first token through their own head
and run unchanged.

Every part of the project scores through `RewardForward`: fine-tuning's evaluation,
diagnostics and the service's transformers backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from merger.formatting import TokenLayout

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; CUDA asked for but absent is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available")
    return torch.device(name)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended position, shape (batch,); padding may be on either side.

    A row with no attended position gets index 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only (0, 1, ... from each row's first real
    token), so that a left-padded row is positioned exactly as the same row unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pools_last_token(model: nn.Module) -> bool:
    """Whether `model` is a decoder classifier: a base model and a `score` head applied per
    position, pooled at the last token (transformers' GPT-2 and generic decoder layout)."""
    base = getattr(model, "base_model", model)
    return isinstance(getattr(model, "score", None), nn.Module) and base is not model


def takes_position_ids(module: nn.Module) -> bool:
    """Whether the module's forward accepts `position_ids` (ALiBi models such as Bloom do not)."""
    parameters = inspect.signature(module.forward).parameters
    return "position_ids" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


class RewardForward(nn.Module):
    """Wraps a `*ForSequenceClassification` model: `forward(input_ids, attention_mask)` gives
    the head's outputs (batch, num_labels) of each row, as a forward of that row alone does.

    For decoder classifiers the base model runs over the batch, the hidden state at each
    row's last attended position is gathered, and the score head runs on those rows only.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.last_token = pools_last_token(model)
        base: Any = getattr(model, "base_model", model)
        self.positions = self.last_token and takes_position_ids(base)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head outputs (batch, num_labels) in the head's dtype (see `place`)."""
        if not self.last_token:
            logits: torch.Tensor = self.model(
                input_ids=input_ids, attention_mask=attention_mask
            ).logits
            return logits
        base: Any = self.model.base_model
        # Positions from the mask: a left-padded row is positioned as the row alone.
        positions = {"position_ids": position_ids_of(attention_mask)} if self.positions else {}
        hidden = base(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **positions
        ).last_hidden_state  # (batch, length, hidden)
        rows = torch.arange(input_ids.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]  # (batch, hidden)
        score: Any = self.model.score
        out: torch.Tensor = score(last)  # (batch, num_labels)
        return out


# The module that maps a pooled hidden state to the rewards, by architecture family.
HEAD_MODULES = ("score", "classifier", "v_head")


def reward_head(model: nn.Module) -> nn.Module | None:
    """The model's reward head (`score`, `classifier` or `v_head`), if it has one of those."""
    named = _named_head(model)
    return named[1] if named else None


def _named_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name in HEAD_MODULES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return name, head
    return None


def saved_head(model_dir: Path, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The reward head's tensors as `model_dir`'s safetensors files hold them (their saved
    dtype, on the CPU), keyed as the head's `state_dict`; None where the model has no known
    head or the files do not hold every tensor of it under the model's names."""
    from safetensors import safe_open

    named = _named_head(model)
    if named is None:
        return None
    name, head = named
    wanted = {f"{name}.{key}": key for key in head.state_dict()}
    found: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt", device="cpu") as shard:
            for key in wanted.keys() & set(shard.keys()):
                found[wanted[key]] = shard.get_tensor(key)
    return found if len(found) == len(wanted) else None


def _to_head_dtype(dtype: torch.dtype) -> Any:
    def cast(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )

    return cast


def place(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    head_dtype: torch.dtype,
    saved: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """`model` moved to `device`: its trunk in `dtype`, its reward head in `head_dtype`.

    The head takes the `saved` weights (`saved_head`: the checkpoint's own, for a model
    loaded straight in `dtype`), else the weights as loaded, never rounded through `dtype` on
    the way, and casts its inputs, the trunk's hidden states, to `head_dtype`: with a bf16
    trunk and an fp32 head, a reward carries the trunk's rounding only, not a bf16 rounding
    of its own.
    """
    head = reward_head(model)
    if head is None or head_dtype == dtype:  # loaded in head_dtype: as saved, or exact
        return model.to(device=device, dtype=dtype)
    loaded = saved or {k: v.detach().clone() for k, v in head.state_dict().items()}
    model.to(device=device, dtype=dtype)
    head.to(dtype=head_dtype)
    head.load_state_dict(loaded)  # copied into the head_dtype parameters
    head.register_forward_pre_hook(_to_head_dtype(head_dtype))
    return model


def attention_implementation(config: Any) -> str | None:
    """The attention kernel a reward model must load with (None: transformers' default).

    SDPA has no attention-logit soft-capping and silently drops it, so a model that caps
    its attention logits (Gemma 2) loads with the eager kernel, which applies it.
    """
    text = config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "eager"
    return None


def filler_id(*candidates: int | None) -> int:
    """The first id given (a pad, else an EOS, ...), else 0: it only fills padded positions,
    which the attention mask excludes."""
    return next((c for c in candidates if c is not None), 0)


def pad_right(
    sequences: Sequence[Sequence[int]], pad: int, min_length: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids and their attention mask, both (n, longest) int64."""
    longest = max(min_length, *(len(s) for s in sequences))
    ids = np.full((len(sequences), longest), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def batch_texts(
    tokenizer: Any, texts: list[str], batch_size: int, max_length: int, side: str = "left"
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches ({input_ids, attention_mask}) of rendered `texts`, in order,
    tokenised by the input contract (`TokenLayout`) and cut to `max_length` from `side`."""
    layout = TokenLayout.of(tokenizer, max_length)
    ids = [row for row, _ in layout.encode(tokenizer, texts, side)]
    return id_batches(ids, filler_id(tokenizer.pad_token_id, tokenizer.eos_token_id), batch_size)


def id_batches(
    ids: Sequence[Sequence[int]], pad: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches ({input_ids, attention_mask}) of token-id rows, in order."""
    batches = []
    for start in range(0, len(ids), batch_size):
        input_ids, mask = pad_right(ids[start : start + batch_size], pad)
        batches.append(
            {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        )
    return batches


def score_batches(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The first head output of every row of `batches`, in order. Shape [N], fp32."""
    forward = model if isinstance(model, RewardForward) else RewardForward(model)
    with torch.inference_mode():
        return torch.cat([forward(**batch)[:, 0].float() for batch in batches])


def load_reward_model(path: str | Path) -> PreTrainedModel:
    """A `*ForSequenceClassification` model from `path`, fp32, eval mode, with the attention
    kernel its config needs (`attention_implementation`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation=attention_implementation(config)
    )
    loaded: PreTrainedModel = model.float().eval()
    return loaded
