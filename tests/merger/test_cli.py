"""`warm-merge` from the command line: strictness errors, atomicity, verify, inspect, dry-run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_rm
from typer.testing import CliRunner

from merger import writer as writer_module
from merger.cli import app
from merger.manifest import read_manifest

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str]:
    """Invoke the CLI in-process; return (exit code, stdout+stderr)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def members(tmp_path: Path, tiny_tokenizer_dir: Path) -> list[Path]:
    """Three tiny fp32 GPT-2 reward models with the same tokenizer."""
    return [
        make_rm(tmp_path / f"m{s}", "gpt2", seed=s, tokenizer_dir=tiny_tokenizer_dir)
        for s in range(3)
    ]


def assert_nothing_written(parent: Path, out: Path) -> None:
    """No output directory and no partial sibling left behind."""
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def edit_config(path: Path, **changes: object) -> None:
    """Rewrite one member's config.json."""
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_build_inspect_verify_round_trip(tmp_path: Path, members: list[Path]) -> None:
    out = tmp_path / "warm"
    code, output = run("build", *members, "--out", out, "--weights", "1,1,2")
    assert code == 0, output
    assert "fingerprint" in output
    code, output = run("inspect", out)
    assert code == 0 and "average" in output and str(members[0]) in output
    code, output = run("inspect", out, "--json")
    assert json.loads(output)["fingerprint"] == read_manifest(out).fingerprint
    code, output = run("verify", out)
    assert code == 0 and "ok" in output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, members: list[Path]) -> None:
    out = tmp_path / "warm"
    code, output = run("build", *members, "--out", out, "--dry-run", "--max-shard-size", "30KB")
    assert code == 0, output
    assert "bytes to read" in output and "model-00001-of-" in output
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "tokenizer.json"])
def test_verify_detects_a_flipped_byte(tmp_path: Path, members: list[Path], target: str) -> None:
    out = tmp_path / "warm"
    assert run("build", *members, "--out", out)[0] == 0
    data = bytearray((out / target).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / target).write_bytes(bytes(data))
    code, output = run("verify", out)
    assert code == 1
    assert target in output and "SHA-256" in output


def test_verify_detects_extra_and_missing_files(tmp_path: Path, members: list[Path]) -> None:
    out = tmp_path / "warm"
    assert run("build", *members, "--out", out)[0] == 0
    (out / "stray.txt").write_text("x")
    (out / "tokenizer.json").unlink()
    code, output = run("verify", out)
    assert code == 1
    assert "stray.txt: not listed" in output and "tokenizer.json: missing" in output


def test_inspect_and_verify_refuse_a_plain_directory(tmp_path: Path, members: list[Path]) -> None:
    for command in ("inspect", "verify"):
        code, output = run(command, members[0])
        assert code == 1 and "warm_manifest.json: missing" in output


def _case(
    name: str, tmp_path: Path, members: list[Path], tok: Path
) -> tuple[list[str | Path], str]:
    """Set up one strictness violation; return (extra CLI args incl. inputs, expected message)."""
    a, b, _ = members
    if name == "shape":
        make_rm(
            tmp_path / "wide", "gpt2", seed=9, config_overrides={"n_embd": 64}, tokenizer_dir=tok
        )
        return [a, tmp_path / "wide"], "has shape"
    if name == "dtype":
        make_rm(tmp_path / "bf16", "gpt2", seed=9, dtype=torch.bfloat16, tokenizer_dir=tok)
        return [a, tmp_path / "bf16"], "has BF16"
    if name == "names":
        make_rm(tmp_path / "bert", "bert", seed=9, tokenizer_dir=tok)
        return [a, tmp_path / "bert"], "is missing"
    if name == "config":
        edit_config(b, resid_pdrop=0.3)
        return [a, b], "field resid_pdrop differs"
    if name == "tokenizer-bytes":
        (b / "tokenizer_config.json").write_text((b / "tokenizer_config.json").read_text() + " ")
        return [a, b], "tokenizer_config.json: differs"
    if name == "tokenizer-missing":
        (b / "tokenizer.json").unlink()
        return [a, b], "tokenizer file tokenizer.json is missing"
    if name == "architecture":
        edit_config(a, architectures=["GPT2LMHeadModel"])
        edit_config(b, architectures=["GPT2LMHeadModel"])
        return [a, b], "expected a *ForSequenceClassification"
    if name == "multi-head":
        for s in (1, 2):
            make_rm(tmp_path / f"two{s}", "gpt2", seed=s, num_labels=2, tokenizer_dir=tok)
        return [tmp_path / "two1", tmp_path / "two2"], "--allow-multi-head"
    if name == "no-head":
        for s in (1, 2):
            save_file({"w": torch.ones(2, 2)}, str(tmp_path / f"bare{s}.safetensors"))
        return [
            tmp_path / "bare1.safetensors",
            tmp_path / "bare2.safetensors",
        ], "no classification head"
    if name == "pickle-file":
        (tmp_path / "rm.bin").write_bytes(b"\x80\x04")
        return [a, tmp_path / "rm.bin"], "pickle checkpoint refused"
    if name == "pickle-dir":
        shutil.rmtree(tmp_path / "old", ignore_errors=True)
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"\x80\x04")
        return [a, tmp_path / "old"], "save_pretrained"
    if name == "mixed-kinds":
        return [a, b / "model.safetensors"], "mix model directories and bare"
    if name == "int-buffer":
        for s in (1, 2):
            save_file(
                {"score.weight": torch.ones(1, 2), "ids": torch.tensor([1, s])},
                str(tmp_path / f"i{s}.safetensors"),
            )
        return [tmp_path / "i1.safetensors", tmp_path / "i2.safetensors"], "I64 tensor ids differs"
    if name == "missing":
        return [a, tmp_path / "nope"], "no such file or directory"
    if name == "corrupt":
        (b / "model.safetensors").write_bytes(b"not a safetensors file")
        return [a, b], "not a readable safetensors file"
    if name == "bad-weights":
        return [a, b, "--weights", "1,-1"], "non-negative"
    if name == "slerp-no-init":
        return [a, b, "--method", "slerp"], "slerp needs --init"
    if name == "init-mismatch":
        make_rm(tmp_path / "bert", "bert", seed=9, tokenizer_dir=tok)
        return [a, b, "--init", tmp_path / "bert", "--liti", "0.5"], "init"
    raise AssertionError(name)


CASES = [
    "shape",
    "dtype",
    "names",
    "config",
    "tokenizer-bytes",
    "tokenizer-missing",
    "architecture",
    "multi-head",
    "no-head",
    "pickle-file",
    "pickle-dir",
    "mixed-kinds",
    "int-buffer",
    "missing",
    "corrupt",
    "bad-weights",
    "slerp-no-init",
    "init-mismatch",
]


@pytest.mark.parametrize("case", CASES)
def test_every_violation_fails_with_one_line_and_writes_nothing(
    tmp_path: Path, members: list[Path], tiny_tokenizer_dir: Path, case: str
) -> None:
    args, message = _case(case, tmp_path, members, tiny_tokenizer_dir)
    out = tmp_path / "warm"
    code, output = run("build", *args, "--out", out)
    assert code == 1, output
    assert output.startswith("error: ") and message in output
    assert len(output.strip().splitlines()) == 1
    assert_nothing_written(tmp_path, out)


def test_ignore_config_key_lifts_a_training_only_difference(
    tmp_path: Path, members: list[Path]
) -> None:
    a, b, _ = members
    edit_config(b, resid_pdrop=0.3)
    code, output = run(
        "build", a, b, "--out", tmp_path / "warm", "--ignore-config-key", "resid_pdrop"
    )
    assert code == 0, output


def test_allow_multi_head(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    heads = [
        make_rm(tmp_path / f"h{s}", "bert", seed=s, num_labels=3, tokenizer_dir=tiny_tokenizer_dir)
        for s in (1, 2)
    ]
    code, output = run("build", *heads, "--out", tmp_path / "warm", "--allow-multi-head")
    assert code == 0, output


def test_existing_output_is_kept_unless_forced(tmp_path: Path, members: list[Path]) -> None:
    out = tmp_path / "warm"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run("build", *members, "--out", out)
    assert code == 1 and "already exists" in output
    assert (out / "keep.txt").read_text() == "mine"
    code, output = run("build", *members, "--out", out, "--force")
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "warm_manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_mid_write_leaves_nothing(
    tmp_path: Path, members: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    original = writer_module.ShardWriter.write

    def interrupted(self: writer_module.ShardWriter, name: str, chunk: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt  # what Ctrl-C raises
        original(self, name, chunk)

    monkeypatch.setattr(writer_module.ShardWriter, "write", interrupted)
    out = tmp_path / "warm"
    code, output = run("build", *members, "--out", out)
    assert code == 130 and "nothing was written" in output
    assert_nothing_written(tmp_path, out)


def test_full_disk_mid_merge_is_one_line_and_leaves_nothing(
    tmp_path: Path, members: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = 0

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        if threading.current_thread().name.startswith("warm-merge-write"):
            calls += 1
            if calls == 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", full_disk)
    out = tmp_path / "warm"
    code, output = run("build", *members, "--out", out)
    assert code == 1
    assert "model.safetensors: write failed: No space left on device" in output
    assert "Traceback" not in output
    assert_nothing_written(tmp_path, out)


def test_sigterm_mid_merge_leaves_nothing(tmp_path: Path, members: list[Path]) -> None:
    # A real process, slowed per tensor so the signal lands mid-merge.
    script = (
        "import sys, time\n"
        "from merger import writer\n"
        "orig = writer.ShardWriter.write\n"
        "def slow(self, name, chunk):\n"
        "    time.sleep(0.2)\n"
        "    orig(self, name, chunk)\n"
        "writer.ShardWriter.write = slow\n"
        "from merger.cli import app\n"
        "sys.argv = ['warm-merge', 'build', *sys.argv[1:]]\n"
        "app()\n"
    )
    out = tmp_path / "warm"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, members), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".warm.partial-")]:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert_nothing_written(tmp_path, out)
