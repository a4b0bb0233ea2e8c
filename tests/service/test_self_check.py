"""The startup self-check, on a calibrated Llama-3 artifact served for real: it passes on both
backends when nothing is wrong, and the pod never turns ready when the served model is broken
the ways users break it (another tokenizer, a changed template, a doubled BOS, a changed
weight, a wrong head)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from families import tokenizer_of
from live import live_server, wait_until
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from merger.calibration import (
    CALIBRATION_NAME,
    Calibration,
    DataRecord,
    GoldenItem,
    PairMetrics,
    Rendering,
    Temperature,
    reward_stats,
)
from merger.manifest import MANIFEST_NAME, compute_fingerprint
from service.encoding import Encoder
from service.errors import ErrorType, ServiceError
from service.loader import load_model
from service.protocol import Item
from service.self_check import SelfCheck, run_self_check, tolerance, verdict
from service.settings import Settings

GOLDEN = 16  # the calibrated_llama fixture's


@pytest.fixture(scope="module")
def calibrated(calibrated_llama: Path) -> Path:
    return calibrated_llama


def settings(model: Path, **overrides: Any) -> Settings:
    return Settings.model_validate({"model": model, "max_length": 512, **overrides})


def test_tolerances_follow_the_dtype() -> None:
    assert tolerance("float32", 5.0) == 1e-4  # absolute, whatever the spread
    assert tolerance("bfloat16", 2.0) == pytest.approx(0.2)
    assert tolerance("float16", 2.0) == pytest.approx(0.04)
    assert tolerance("float32", 2.0, tf32=True) == pytest.approx(0.04)  # fp16's mantissa


class Stuck:
    """A scheduler that admits `room` requests at a time and answers `answered` of them."""

    def __init__(self, room: int, answered: int) -> None:
        self.room, self.answered = room, answered
        self.jobs: list[Any] = []
        self.cancelled: list[Any] = []

    def submit(self, sequences: Any, deadline: float) -> Any:
        waiting = [j for j in self.jobs if not j.future.done()]
        if len(waiting) >= self.room:
            raise ServiceError(ErrorType.OVERLOADED, "queue full")
        job = SimpleNamespace(future=asyncio.get_running_loop().create_future())
        if len(self.jobs) < self.answered:
            job.future.set_result(np.array([[0.25]]))
        self.jobs.append(job)
        return job

    def cancel(self, job: Any, reason: str) -> None:
        self.cancelled.append(job)


def test_a_golden_set_that_cannot_be_scored_fails_the_check(tiny_tokenizer_dir: Path) -> None:
    encoder = Encoder(
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir), max_length=64, separator="\n\n"
    )
    golden = [
        GoldenItem(prompt="a cat", response=f"sat on mat {i}", n_tokens=len(ids), reward=0.25)
        for i, ids in enumerate(
            e.ids
            for e in encoder.encode(
                [Item(prompt="a cat", response=f"sat on mat {i}") for i in range(4)], "left"
            )
        )
    ]
    metrics = PairMetrics(pairs=1, accuracy=1.0, log_loss=0.1)
    calibration = Calibration(
        data=DataRecord(name="d", sha256="0" * 64, pairs=2, holdout=0.5, seed=0),
        rendering=Rendering(separator="\n\n", max_length=64, truncation_side="left"),
        rewards=reward_stats([0.0, 1.0]),
        temperature=Temperature(value=1.0, fit_pairs=1, before=metrics, after=metrics),
        golden=golden,
    )

    def check(scheduler: Stuck, timeout_s: float) -> SelfCheck:
        return asyncio.run(
            run_self_check(scheduler, encoder, calibration, "float32", timeout_s=timeout_s)  # type: ignore[arg-type]
        )

    # Room for one request at a time: each waits for the one before; all answered, passed.
    assert check(Stuck(room=1, answered=4), 5).status == "passed"
    # Never answered: the check fails at its deadline and withdraws what it submitted.
    stuck = Stuck(room=10, answered=2)
    result = check(stuck, 0.2)
    assert result.status == "failed" and "timed out after 0.2 s" in result.detail
    assert result.max_deviation is None and len(stuck.cancelled) == 2


def test_a_failure_warns_or_stops_by_mode() -> None:
    failed = SelfCheck("failed", 4, 0.5, 1e-4, "golden[2] ...")
    assert verdict(failed, "warn").status == "warned"
    stopped = verdict(failed, "fail")
    assert stopped.status == "failed" and stopped.detail.startswith("self-check failed: golden[2]")
    assert verdict(SelfCheck("passed", 4, 0.0, 1e-4), "fail").status == "passed"


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("transformers", "float32"), ("transformers", "bfloat16"), ("vllm", "float32")],
)
def test_the_golden_set_passes_through_the_real_serving_path(
    calibrated: Path, backend: str, dtype: str, request: pytest.FixtureRequest
) -> None:
    extra: dict[str, Any] = {"dtype": dtype}
    if backend == "vllm":
        request.getfixturevalue("needs_vllm")
        extra |= {"backend": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_gib": 0.25}
    with live_server(settings(calibrated, **extra)) as live, live.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        metrics = live.metrics()
    check = card["self_check"]
    assert check["status"] == "passed" and check["checked"] == GOLDEN, check
    assert check["max_deviation"] <= check["tolerance"] and check["seconds"] > 0
    if dtype == "float32":
        assert check["tolerance"] == 1e-4
    assert metrics['warm_self_check{status="passed"}'] == 1
    assert metrics["warm_self_check_max_deviation"] == pytest.approx(check["max_deviation"])
    scale = card["scale"]
    assert scale["reward"] == "raw" and scale["calibration"]["temperature"] > 0
    assert len(scale["calibration"]["quantiles"]) == 101


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(artifact, out)
    return out


def edit_tokenizer_config(model: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def another_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    tokenizer_of("mistral").save_pretrained(model)


def another_template(model: Path) -> None:
    def change(config: dict[str, Any]) -> None:
        config["chat_template"] = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        )

    if (model / "chat_template.jinja").is_file():
        (model / "chat_template.jinja").write_text(
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        )
    else:
        edit_tokenizer_config(model, change)


def bos_twice(model: Path) -> None:
    path = model / "chat_template.jinja"
    if path.is_file():
        path.write_text("{{ bos_token }}" + path.read_text())
    else:
        edit_tokenizer_config(
            model, lambda c: c.update(chat_template="{{ bos_token }}" + c["chat_template"])
        )


def edit_weights(model: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    path = model / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: change(k, fh.get_tensor(k)) for k in fh.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)


def one_weight_changed(model: Path) -> None:
    edit_weights(model, lambda k, t: t * 1.05 if k.endswith("layers.1.mlp.down_proj.weight") else t)


def another_head(model: Path) -> None:
    edit_weights(model, lambda k, t: torch.flip(t, dims=[-1]) if k == "score.weight" else t)


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        (another_tokenizer, "not the tokenizer or chat template"),
        (another_template, "not the tokenizer or chat template"),
        (bos_twice, "not the tokenizer or chat template"),
        (one_weight_changed, "served"),
        (another_head, "served"),
    ],
)
def test_a_broken_model_never_turns_ready(
    calibrated: Path, tmp_path: Path, breakage: Callable[[Path], None], says: str
) -> None:
    broken = copy_of(calibrated, tmp_path)
    breakage(broken)
    with live_server(settings(broken), ready=False) as live, live.client() as client:
        wait_until(lambda: live.state.load_error is not None, 120, "the load to fail")
        ready = client.get("/ready")
        metrics = live.metrics()
    error = live.state.load_error or ""
    assert ready.status_code == 503 and not live.state.ready
    assert error.startswith("SelfCheckFailed: self-check failed: golden["), error
    assert says in error and "tolerance" in error
    assert metrics['warm_self_check{status="failed"}'] == 1


def test_a_wrong_number_of_labels_fails_the_load(calibrated: Path, tmp_path: Path) -> None:
    broken = copy_of(calibrated, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["num_labels"] = 2
    config["id2label"] = {"0": "a", "1": "b"}
    config["label2id"] = {"a": 0, "b": 1}
    (broken / "config.json").write_text(json.dumps(config))
    with live_server(settings(broken), ready=False) as live:
        wait_until(lambda: live.state.load_error is not None, 120, "the load to fail")
    assert not live.state.ready


def test_warn_serves_a_broken_model_and_says_so(calibrated: Path, tmp_path: Path) -> None:
    broken = copy_of(calibrated, tmp_path)
    another_head(broken)
    with live_server(settings(broken, self_check="warn")) as live, live.client() as client:
        check = client.get("/v1/models").json()["data"][0]["self_check"]
        scored = client.post("/v1/score", json={"items": [{"text": "hello"}]})
    assert check["status"] == "warned" and check["max_deviation"] > check["tolerance"]
    assert scored.status_code == 200
    with live_server(settings(broken, self_check="off")) as live, live.client() as client:
        check = client.get("/v1/models").json()["data"][0]["self_check"]
    assert check["status"] == "off" and check["checked"] == 0


def test_a_plain_model_starts_without_a_self_check(gpt2_rm: Path) -> None:
    with live_server(Settings.model_validate({"model": gpt2_rm})) as live, live.client() as client:
        card = client.get("/v1/models").json()["data"][0]
    assert (
        card["self_check"]["status"] == "skipped"
        and card["self_check"]["detail"] == "no golden set"
    )
    assert card["scale"] == {"reward": "raw", "default_normalize": "none", "calibration": None}


def test_an_unlisted_calibration_is_served_as_none(
    calibrated: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A calibration interrupted between its two writes: the file is there, the manifest
    # does not list it.
    broken = copy_of(calibrated, tmp_path)
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    del manifest["files"][CALIBRATION_NAME]
    manifest["fingerprint"] = compute_fingerprint(manifest["files"])
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="service.loader"):
        loaded = load_model(settings(broken, warmup=False))
    assert loaded.calibration is None
    assert "not listed in the manifest, ignored (calibrate again)" in caplog.text


def test_warm_serve_exits_non_zero_with_one_line(calibrated: Path, tmp_path: Path) -> None:
    broken = copy_of(calibrated, tmp_path)
    another_head(broken)
    argv = [sys.executable, "-m", "service.cli", "--model", str(broken), "--port", "0",
            "--max-length", "512"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "self-check failed" in line]
    assert len(lines) == 1 and "served" in lines[0] and "recorded" in lines[0], done.stderr[-2000:]
