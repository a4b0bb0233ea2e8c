"""Sanity checks for the toy char tokenizer, policy and last-character reward model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_rl import CHARS, char_tokenizer, save_last_char_rm, save_toy_policy
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


@pytest.mark.parametrize("text", [CHARS, "hello, world.", " a  b ", "", "z"])
def test_char_tokenizer_round_trips(text: str) -> None:
    tok = char_tokenizer()
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert all(i >= 4 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(CHARS)


def test_char_tokenizer_reloads(tmp_path: Path) -> None:
    char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "the sky is blue, ok."
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.pad_token_id == 3


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_last_char_rm_scores_right_padded_batch(tmp_path: Path, scale: float) -> None:
    rm_dir = save_last_char_rm(tmp_path / "rm", good="a.", scale=scale)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    texts = ["abc", "xyz a", "hello.", "a", "quite a long sentence, sure", "b."]
    expected = torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]) * scale
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["input_ids"] == tok.pad_token_id).any()  # really padded
    with torch.no_grad():
        scores = model(**batch).logits.squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_toy_policy_samples_left_padded_batch(tmp_path: Path) -> None:
    policy_dir = save_toy_policy(tmp_path / "policy", seed=3)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    prompts = ["say a", "write a longer prompt."]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=True,
            max_new_tokens=8,
            min_new_tokens=8,
            pad_token_id=tok.pad_token_id,
        )
    prompt_len = batch["input_ids"].shape[1]
    assert out.shape == (2, prompt_len + 8)
    completions = tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    assert len(completions) == 2
    assert all(set(c) <= set(CHARS) for c in completions)
