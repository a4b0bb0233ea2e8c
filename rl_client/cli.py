"""`warm-rl train` and `warm-rl best-of-n`: parse one configuration, delegate, report."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsError

from rl_client.config import BestOfNConfig, TrainConfig
from rl_client.errors import RewardClientError

S = TypeVar("S", bound=BaseSettings)
USAGE = """usage: warm-rl {train,best-of-n} [--help] [options]

  train      REINFORCE / RLOO with a KL penalty, rewarded by a warm-serve endpoint
  best-of-n  generate (or take) N candidates per prompt, keep the best by the reward model
"""


def parse(config: type[S], argv: list[str], prog: str) -> S:
    """A configuration from flags and WARM_RL_* variables; exits 2 with one line per problem."""
    try:
        return CliApp.run(config, cli_args=argv)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(p) for p in problem["loc"]) or "config"
            print(f"{prog}: {field}: {problem['msg']}", file=sys.stderr)
    except SettingsError as error:
        print(f"{prog}: {error}", file=sys.stderr)
    raise SystemExit(2)


def read_best_of_n_inputs(path: Path) -> list[dict[str, Any]]:
    """Records {'prompt': str, 'candidates': [str] | None} from JSONL or a text file."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix not in {".jsonl", ".json"}:
        return [{"prompt": line, "candidates": None} for line in lines]
    records = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        candidates = record.get("candidates")
        if not isinstance(record.get("prompt"), str) or not (
            candidates is None
            or (isinstance(candidates, list) and all(isinstance(c, str) for c in candidates))
        ):
            raise ValueError(
                f"{path}:{number}: expected {{'prompt': str, 'candidates': [str, ...]}}"
            )
        records.append({"prompt": record["prompt"], "candidates": candidates})
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_best_of_n(cfg: BestOfNConfig) -> None:
    """Rerank given candidates, or generate them with --policy first; JSONL results."""
    from rl_client.best_of_n import best_of_n, generate_candidates
    from rl_client.client import RewardClient

    records = read_best_of_n_inputs(cfg.prompts)
    prompts = [r["prompt"] for r in records]
    missing = [i for i, r in enumerate(records) if r["candidates"] is None]
    candidates: list[list[str]] = [r["candidates"] or [] for r in records]
    if missing:
        if cfg.policy is None:
            raise ValueError(f"prompt {missing[0] + 1} has no candidates: give --policy")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from merger.scoring import resolve_device

        tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
        model: Any = AutoModelForCausalLM.from_pretrained(cfg.policy)
        model.to(resolve_device(cfg.device)).eval()
        generated = generate_candidates(
            model,
            tokenizer,
            [prompts[i] for i in missing],
            cfg.n,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
        )
        for i, texts in zip(missing, generated, strict=True):
            candidates[i] = texts
    with RewardClient(
        cfg.reward_url, api_key=cfg.api_key, expected_fingerprint=cfg.expected_fingerprint
    ) as client:
        results = best_of_n(client, prompts, candidates)
    text = "".join(json.dumps(r.to_json()) + "\n" for r in results)
    if cfg.out is None:
        sys.stdout.write(text)
    else:
        write_atomic(cfg.out, text)
        print(f"warm-rl best-of-n: {len(results)} results -> {cfg.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `warm-rl`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(USAGE, end="")
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    try:
        if command == "train":
            from rl_client.trainer import train

            cfg = parse(TrainConfig, rest, "warm-rl train")
            history = train(cfg)
            last = history[-1] if history else {}
            print(
                f"warm-rl train: {len(history)} steps logged in {cfg.out / 'log.jsonl'}; "
                f"final policy in {cfg.out / 'checkpoint'}; last reward {last.get('reward')}",
                file=sys.stderr,
            )
        elif command == "best-of-n":
            run_best_of_n(parse(BestOfNConfig, rest, "warm-rl best-of-n"))
        else:
            print(f"warm-rl: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
            raise SystemExit(2)
    except (RewardClientError, ValueError, OSError) as error:
        print(f"warm-rl {command}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
