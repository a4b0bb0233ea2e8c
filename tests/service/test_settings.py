"""Settings: defaults, environment, CLI flags, and the errors they give."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from merger.formatting import DEFAULT_SEPARATOR
from service import cli
from service.settings import Settings


@pytest.fixture(autouse=True)
def _no_warm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate every test from WARM_* variables of the surrounding environment."""
    for name in [n for n in os.environ if n.startswith("WARM_")]:
        monkeypatch.delenv(name)


# --- settings -------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = Settings()
    assert (s.model, s.model_id, s.backend) == (None, None, "transformers")
    assert (s.device, s.dtype, s.max_length, s.truncation_side) == ("auto", "auto", None, "left")
    assert (s.separator, s.reward_index, s.trust_remote_code) == (DEFAULT_SEPARATOR, 0, False)
    assert (s.torch_threads, s.warmup, s.batch_overhead_tokens) == (None, True, None)
    assert (s.model_workers, s.front_nice, s.compile) == (None, 0, False)
    assert (s.max_batch_size, s.max_batch_tokens, s.max_wait_ms) == (64, 16384, 0.0)
    # 1 << 20 = 1048576; 32 << 20 = 33554432.
    assert (s.max_queue_requests, s.max_queue_tokens, s.max_body_bytes) == (1024, 1048576, 33554432)
    assert (s.max_items_per_request, s.max_chars_per_item) == (1024, 200_000)
    assert (s.request_timeout_s, s.api_keys, s.protect_metrics) == (120.0, [], False)
    assert (s.host, s.port, s.graceful_shutdown_s, s.log_level) == ("127.0.0.1", 8000, 30.0, "info")


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARM_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("WARM_API_KEYS", '["a","b"]')
    monkeypatch.setenv("WARM_DEVICE", "cuda:1")
    monkeypatch.setenv("WARM_WARMUP", "false")
    s = Settings()
    assert s.max_batch_size == 7 and s.device == "cuda:1" and s.warmup is False
    assert [k.get_secret_value() for k in s.api_keys] == ["a", "b"]


def test_settings_cli_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WARM_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("WARM_MAX_WAIT_MS", "2.5")
    args = ["--max-batch-size", "5", "--no-warmup", "--model", str(tmp_path)]
    s = CliApp.run(Settings, cli_args=args)
    assert (s.max_batch_size, s.warmup, s.model) == (5, False, tmp_path)
    assert s.max_wait_ms == 2.5  # not given as a flag: the environment's value stays


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"device": "tpu"}, "device 'tpu'"),
        ({"device": "cpu:0"}, "device 'cpu:0'"),
        ({"device": "cuda:x"}, "device 'cuda:x'"),
        ({"max_batch_size": 0}, "greater than or equal to 1"),
        ({"api_keys": ["good", ""]}, "empty key"),
        ({"max_length": 100, "max_batch_tokens": 50}, "exceeds max_batch_tokens 50"),
        ({"unknown_field": 1}, "Extra inputs"),
    ],
)
def test_settings_invalid(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_settings_max_length_equal_to_budget_is_fine() -> None:
    assert Settings(max_length=50, max_batch_tokens=50).max_length == 50


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--device", "tpu"], "device"),
        (["--max-length", "100", "--max-batch-tokens", "50"], "max_length 100"),
    ],
)
def test_cli_parse_exits_2_naming_the_field(
    args: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse(args)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warm-serve: ") and field in lines[0]
