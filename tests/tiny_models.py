"""Tiny real Hugging Face reward models, built offline from configs: the tokenizer, the
checkpoints and what reads them back (shared by the tests of every package)."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

Arch = Literal["gpt2", "bert", "llama"]
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]  # ids 0..3, fixed by the trainer's order
BOS_ID, EOS_ID, UNK_ID, PAD_ID = range(4)
VOCAB_SIZE = 300
MAX_POSITIONS = 128
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")

_SUBJECTS = ["The assistant", "A helpful model", "The reward model", "Our policy", "The answer"]
_VERBS = ["explains", "summarises", "refuses", "answers", "describes", "ranks"]
_OBJECTS = [
    "the question clearly and politely.",
    "a harmful request without any detail.",
    "why the sky is blue on a sunny day.",
    "the steps needed to bake fresh bread.",
    "two responses and prefers the honest one.",
    "a short poem about the quiet sea.",
    "how weight averaging makes rewards robust.",
]
# 5 * 6 * 7 = 210 lines of plain English for training the tokenizer.
CORPUS = [f"{s} {v} {o}" for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]


@functools.cache
def _train_tokenizer() -> PreTrainedTokenizerFast:
    """Train (once per process) a byte-level BPE of VOCAB_SIZE tokens on CORPUS."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    assert len(fast) == VOCAB_SIZE, len(fast)
    assert fast.pad_token_id == PAD_ID
    return fast


def save_tiny_tokenizer(out_dir: Path) -> Path:
    """Save the tiny BPE tokenizer (vocab VOCAB_SIZE, pad id PAD_ID) into out_dir."""
    _train_tokenizer().save_pretrained(out_dir)
    return out_dir


_ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "gpt2": (
        GPT2Config,
        GPT2ForSequenceClassification,
        {"n_positions": MAX_POSITIONS, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64},
    ),
    "bert": (
        BertConfig,
        BertForSequenceClassification,
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
    "llama": (
        LlamaConfig,
        LlamaForSequenceClassification,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": MAX_POSITIONS,
            "tie_word_embeddings": False,
        },
    ),
}


def make_rm(
    out_dir: Path,
    arch: Arch,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    num_labels: int = 1,
    max_shard_size: str | None = None,
    tokenizer_dir: Path | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Save a tiny seeded `<Arch>ForSequenceClassification` checkpoint (safetensors) to out_dir."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config_cls, model_cls, arch_kwargs = _ARCHS[arch]
    defaults = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID}
    config = config_cls(
        num_labels=num_labels,
        eos_token_id=EOS_ID,
        **(defaults | arch_kwargs | (config_overrides or {})),
    )
    model = model_cls(config)
    with torch.no_grad():  # jitter every tensor so that no weight (LayerNorm, biases) is seed-free
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.02)
    model = model.to(dtype).eval()
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    if max_shard_size is not None:
        shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
        assert (out_dir / "model.safetensors.index.json").is_file(), "checkpoint was not sharded"
        assert len(shards) > 1, f"expected several shards, got {shards}"
    if tokenizer_dir is not None:
        for src in Path(tokenizer_dir).iterdir():
            if src.is_file():
                shutil.copy2(src, out_dir / src.name)
    return out_dir


def load_config(path: Path) -> dict[str, Any]:
    """Read a checkpoint's config.json without the volatile keys that differ between saves."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG_KEYS}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint dir (sharded or not) or of a bare .safetensors file."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


# vLLM's CPU attention for decoders (paged KV cache) takes head sizes of 32, 64, 80, ...:
# the tiny GPT-2 and BERT (2 heads of 16) get one head of 32 for the vllm backend.
ONE_HEAD = {"n_head": 1}
