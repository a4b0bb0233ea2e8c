"""The RL experiment's initial policy: a small GPT-2 that writes prefdata-style answers.

What. `word_tokenizer` is a word-level tokenizer over exactly the words and punctuation that
`merger.recipe.prefdata` prompts and responses use, and `make_policy` supervised-fine-tunes a small
randomly initialised GPT-2 on prefdata prompts followed by BOTH the chosen and the rejected
response of each training pair, then saves it as a Hugging Face causal-LM directory that
`warm-rl train` (and `rl_client.rollout.sample`) can load.

Why this way. The WARM paper's RL claim is about a policy optimised against a proxy reward
model, with the true reward (here `prefdata.oracle`) logged on the side. That needs a policy
whose samples are already well-formed pool sentences, so the RMs are scored in distribution,
and that still mixes good and bad answers (off-topic, rude, filler, the spurious opener), so
RL has room to improve and the proxy has something to hack. Training on the rejected answers
as well as the chosen ones keeps the mean oracle of its samples well below the best (3.0).
A word-level vocabulary (about 360 tokens) keeps the model tiny and lets a CPU train it in
about a minute; decoding gives text the oracle reads exactly as the original (lower-cased,
which the oracle ignores, with natural "word." spacing).

The policy is cached: `out` holds a key of every setting that determines it (and of the
prefdata source), and a call with the same settings returns it without retraining.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from merger.recipe import prefdata
from merger.writer import atomic_file

SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")  # ids 0..3
BOS_ID, EOS_ID, UNK_ID, PAD_ID = range(4)
PUNCTUATION = (".", ",", "!", "?")
SPACE = "\u2581"  # "▁": marks a word that follows a space, as in SentencePiece
COMPLETION_TOKENS = 64  # the longest completion the RL experiment samples
N_POSITIONS = 128  # the longest prompt (16 tokens) + a completion, with room to spare
KEY_FILE = "warm_repro_policy.json"
FORMAT_VERSION = 1  # bump when the training recipe changes: invalidates cached policies
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", KEY_FILE)

Log = Callable[[str], None]


def prompt_words() -> set[str]:
    """Every word of every prompt template and subject, over all splits."""
    words: set[str] = set()
    for template in (*prefdata.ID_TEMPLATES, *prefdata.OOD_TEMPLATES):
        words.update(prefdata.tokenize(template.format("")))
    for topic in prefdata.TOPICS:
        for subject in topic.subjects:
            words.update(prefdata.tokenize(subject))
    return words


def vocabulary() -> dict[str, int]:
    """Token -> id: specials, punctuation, then each word (lower-case) with its space mark."""
    words = sorted((set(prefdata.WORDS) | prompt_words()) - set(PUNCTUATION))
    tokens = [*SPECIAL_TOKENS, *PUNCTUATION, *(SPACE + w for w in words)]
    return {token: i for i, token in enumerate(tokens)}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer for prefdata text; `<s>` is prepended to each text.

    Words carry a leading space mark and punctuation does not, so decoding reads
    "certainly! salt the water well." -- the oracle's tokens and sentences, unchanged.
    """
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Strip(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex("[.,!?]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=N_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


@dataclass(frozen=True)
class PolicySettings:
    """Everything that determines a trained policy (its cache key)."""

    seed: int
    n_pairs: int
    epochs: int
    batch_size: int
    lr: float
    n_layer: int
    n_embd: int
    n_head: int

    def key(self) -> str:
        """SHA-256 over the settings, the recipe version and prefdata's source."""
        source = Path(prefdata.__file__).read_bytes()
        parts = [FORMAT_VERSION, asdict(self), hashlib.sha256(source).hexdigest()]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Example:
    """One training sequence: `<s>` prompt response `</s>`; the loss reads the response."""

    input_ids: list[int]
    prompt_length: int


def examples(tokenizer: PreTrainedTokenizerFast, n_pairs: int, seed: int) -> list[Example]:
    """Both responses of each "train" pair, after their prompt, cut to N_POSITIONS tokens."""
    out = []
    for pair in prefdata.generate("train", n_pairs, seed=seed):
        prompt = tokenizer(pair.prompt)["input_ids"]
        for response in (pair.chosen, pair.rejected):
            answer = tokenizer(response, add_special_tokens=False)["input_ids"]
            ids = [*prompt, *answer, EOS_ID][:N_POSITIONS]
            out.append(Example(ids, len(prompt)))
    return out


def collate(batch: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)  # (B, L)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, L)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, e.prompt_length : n] = ids[row, e.prompt_length : n]
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_model(settings: PolicySettings, vocab_size: int) -> GPT2LMHeadModel:
    """A fresh GPT-2 without dropout (the trainer samples and scores in eval mode)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=N_POSITIONS,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        max_new_tokens=COMPLETION_TOKENS,
    )
    return model


def fine_tune(
    model: GPT2LMHeadModel, data: list[Example], settings: PolicySettings, log: Log
) -> float:
    """AdamW over shuffled batches, learning rate decayed linearly to 0; the last loss."""
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    model.train()
    loss = math.nan
    for epoch in range(settings.epochs):
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(data), settings.batch_size):
            batch = collate([data[i] for i in order[start : start + settings.batch_size]])
            batch_loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss = batch_loss.item()
        log(f"policy SFT epoch {epoch + 1}/{settings.epochs}: loss {loss:.3f}")
    model.eval()
    return loss


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: unchanged), restoring the previous count.

    The model's matrices are small: one thread is nearly as fast as two on an idle machine,
    and on cores shared with other work two threads were 8x slower (OpenMP barriers spin).
    """
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_cached(out: Path, key: str) -> bool:
    """Whether `out` holds a complete policy trained with the settings of `key`."""
    if not all((out / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        return bool(json.loads((out / KEY_FILE).read_text())["key"] == key)
    except (ValueError, KeyError, TypeError):
        return False


def save_atomic(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, out: Path, record: dict[str, Any]
) -> None:
    """Write into a temporary sibling of `out`, then swap it into place whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / KEY_FILE).write_text(json.dumps(record, indent=2) + "\n")
        old = None
        if out.exists():  # a stale policy: moved aside, deleted once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_policy(
    out: Path,
    *,
    seed: int = 0,
    n_pairs: int = 6000,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 3e-3,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    threads: int | None = 1,
    log: Log = print,
) -> Path:
    """The initial policy in `out`: trained on prefdata "train" pairs, or reused if cached.

    `threads` (torch intra-op threads while training; None keeps torch's setting) changes
    only the speed, so it is not part of the cache key.
    """
    out = Path(out)
    settings = PolicySettings(seed, n_pairs, epochs, batch_size, lr, n_layer, n_embd, n_head)
    key = settings.key()
    if is_cached(out, key):
        log(f"policy: reusing {out}")
        return out
    tokenizer = word_tokenizer()
    data = examples(tokenizer, n_pairs, seed)
    model = build_model(settings, len(tokenizer))
    log(f"policy: {model.num_parameters():,} parameters, {len(data)} sequences")
    start = time.perf_counter()
    with torch_threads(threads):
        loss = fine_tune(model, data, settings, log)
    seconds = time.perf_counter() - start
    log(f"policy: trained in {seconds:.1f} s, saving to {out}")
    record = {"key": key, "settings": asdict(settings), "final_loss": loss, "train_s": seconds}
    save_atomic(model, tokenizer, out, record)
    return out


def write_prompts(path: Path, n: int, seed: int, split: str = "train") -> Path:
    """A JSONL of `{"prompt": ...}` lines from `prefdata.sample_prompts`, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        for prompt in prefdata.sample_prompts(n, seed, split):
            fh.write((json.dumps({"prompt": prompt}) + "\n").encode())
    return path
