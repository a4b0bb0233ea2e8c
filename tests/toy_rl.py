"""Toy policy and reward model for policy-gradient trainer smoke tests.

The reward is trivially learnable: +scale when a completion ends with a "good" character.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]  # ids 0..3
BOS_ID, EOS_ID, UNK_ID, PAD_ID = range(4)
_GPT2_KWARGS = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ids 0..3 are specials, then one token per char of CHARS."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def _config(**kwargs: object) -> GPT2Config:
    """GPT-2 config sized for the char tokenizer, with pad/bos/eos ids set."""
    return GPT2Config(
        vocab_size=len(char_tokenizer()),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **_GPT2_KWARGS,
        **kwargs,
    )


def save_toy_policy(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random GPT2LMHeadModel policy plus the char tokenizer into out_dir."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_config()).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    char_tokenizer().save_pretrained(out_dir)
    return out_dir


def save_last_char_rm(out_dir: Path, good: str, scale: float = 1.0) -> Path:
    """Save a GPT-2 RM scoring +scale if the text's last char is in `good`, else -scale."""
    out_dir = Path(out_dir)
    tok = char_tokenizer()
    config = _config(num_labels=1)
    model = GPT2ForSequenceClassification(config).eval()
    d = config.n_embd
    u = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(d)])  # zero mean, unit variance
    signs = torch.full((config.vocab_size,), -1.0)
    for ch in good:
        signs[tok.convert_tokens_to_ids(ch)] = 1.0
    with torch.no_grad():
        # Blocks add nothing to the residual stream: it stays wte[token] + wpe[pos].
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(signs[:, None] * u[None, :])
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        # ln_f(s*u) = s*u / sqrt(1 + eps); undo that factor so score == scale * s.
        norm = math.sqrt(1.0 + config.layer_norm_epsilon)
        model.score.weight.copy_((scale * norm / d) * u[None, :])
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
