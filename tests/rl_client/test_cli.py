"""`warm-rl`: its two commands end to end against a live service, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from live import Live
from toy_rl import save_toy_policy

from rl_client.cli import main


def run(argv: list[str]) -> int:
    """`warm-rl ARGV` in-process; its exit status."""
    try:
        main(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    return 0


def test_usage_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(sys.executable).with_name("warm-rl")
    done = subprocess.run([str(script)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "usage: warm-rl {train,best-of-n}" in done.stdout
    assert run(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert run(["train", "--policy", "p", "--group-size", "0"]) == 2
    assert "warm-rl train: group_size: Input should be greater than or equal to 1" in (
        capsys.readouterr().err
    )


def test_best_of_n_reranks_given_candidates(
    rm_server: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in.jsonl"
    records = [
        {"prompt": "say", "candidates": ["crab", "banana", "dog"]},
        {"prompt": "name a fruit", "candidates": ["kiwi", "fig"]},
    ]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out" / "best.jsonl"
    argv = ["best-of-n", "--prompts", str(inputs), "--reward-url", rm_server.url, "--out", str(out)]
    assert run(argv) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["best"] for r in results] == ["banana", "kiwi"]
    assert results[0]["rewards"] == [-1.0, 1.0, -1.0]
    assert "2 results" in capsys.readouterr().err


def test_best_of_n_generates_with_a_policy(
    rm_server: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = save_toy_policy(tmp_path / "policy", seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc\nhello\n")
    argv = ["best-of-n", "--prompts", str(prompts), "--reward-url", rm_server.url]
    assert run(argv) == 1
    assert "prompt 1 has no candidates: give --policy" in capsys.readouterr().err
    argv += ["--policy", str(policy), "-n", "6", "--max-new-tokens", "4"]
    assert run(argv) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in results] == ["abc", "hello"]
    for r in results:
        assert len(r["candidates"]) == 6
        assert r["rewards"][r["best_index"]] == max(r["rewards"])
        assert r["best"] == r["candidates"][r["best_index"]]


def test_train_runs_and_resumes(
    rm_server: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = save_toy_policy(tmp_path / "policy", seed=0)
    out = tmp_path / "run"
    common = ["train", "--policy", str(policy), "--reward-url", rm_server.url, "--out", str(out)]
    common += ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4"]
    assert run([*common, "--steps", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split("\n")[0].split() == [
        "step", "reward", "reward_std", "kl", "return", "length", "entropy", "reward_s"
    ]  # fmt: skip
    assert "2 steps logged" in captured.err
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert run([*common, "--steps", "3", "--device", "cpu"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
