"""End-to-end merges of tiny real reward models: exact values, methods, determinism, loading."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tiny_models import load_state, make_rm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from merger import build, hashing
from merger.build import run_merge
from merger.checkpoints import TensorReader, input_files
from merger.config import MergeSpec, Method
from merger.errors import MergeError
from merger.hashing import FileHashes
from merger.manifest import MANIFEST_NAME, read_manifest, verify_artifact
from merger.methods import slerp_merge
from merger.plan import plan_merge

ULP_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype float tensors."""
    ia, ib = a.view(ULP_VIEW[a.dtype]).long(), b.view(ULP_VIEW[b.dtype]).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


def exact_mean(
    states: list[dict[str, torch.Tensor]], weights: list[float], name: str
) -> torch.Tensor:
    """(sum_i w_i x_i) / sum_i w_i by hand in fp64.

    The weighted sum is exact for fp32/bf16 inputs and small integer weights, so the one
    division gives the correctly rounded mean.
    """
    total = sum(w * s[name].double() for s, w in zip(states, weights, strict=True))
    return total / sum(weights)  # type: ignore[no-any-return]


def merge(inputs: list[Path], out: Path, **kwargs: object) -> Path:
    """Run the merger in-process."""
    run_merge(plan_merge(MergeSpec(inputs=tuple(inputs), **kwargs)), out)  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_uniform_average_equals_the_hand_computed_mean(
    tmp_path: Path, tiny_tokenizer_dir: Path, arch: str, dtype: torch.dtype, shard: str | None
) -> None:
    members = [
        make_rm(
            tmp_path / f"m{s}",
            arch,
            seed=s,
            dtype=dtype,
            max_shard_size=shard,  # type: ignore[arg-type]
            tokenizer_dir=tiny_tokenizer_dir,
        )
        for s in range(3)
    ]
    out = merge(members, tmp_path / "warm", max_shard_size=30_000 if shard else 10**9)
    states = [load_state(m) for m in members]
    merged = load_state(out)
    assert set(merged) == set(states[0])
    for name, tensor in merged.items():
        assert tensor.dtype == dtype and tensor.shape == states[0][name].shape
        assert torch.equal(tensor, exact_mean(states, [1, 1, 1], name).to(dtype)), name
    assert (out / "model.safetensors.index.json").is_file() == bool(shard)
    verify_artifact(out)
    # The artifact is a Hugging Face model directory: it loads and scores.
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tokenizer(
        ["The assistant explains", "Our policy ranks the answer"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


@pytest.fixture
def gpt2_members(tmp_path: Path, tiny_tokenizer_dir: Path) -> list[Path]:
    """Three tiny fp32 GPT-2 reward models and, as a fourth, their shared 'init'."""
    return [
        make_rm(tmp_path / f"g{s}", "gpt2", seed=s, tokenizer_dir=tiny_tokenizer_dir)
        for s in range(4)
    ]


def test_weights_normalised_to_the_simplex(tmp_path: Path, gpt2_members: list[Path]) -> None:
    a, b, c, _ = gpt2_members
    out = merge([a, b, c], tmp_path / "w", weights=(2.0, 1.0, 1.0))
    states = [load_state(p) for p in (a, b, c)]
    for name, tensor in load_state(out).items():
        assert max_ulp(tensor, exact_mean(states, [2, 1, 1], name).float()) == 0
    assert read_manifest(out).merge.weights == [0.5, 0.25, 0.25]


def test_zero_weight_member_does_not_count(tmp_path: Path, gpt2_members: list[Path]) -> None:
    a, b, c, _ = gpt2_members
    two = load_state(merge([a, b], tmp_path / "two"))
    three = load_state(merge([a, b, c], tmp_path / "three", weights=(1.0, 1.0, 0.0)))
    assert all(torch.equal(two[k], three[k]) for k in two)


def test_liti_interpolates_toward_init(tmp_path: Path, gpt2_members: list[Path]) -> None:
    a, b, c, init = gpt2_members
    out = merge([a, b, c], tmp_path / "liti", init=init, liti=0.25)
    states = [load_state(p) for p in (init, a, b, c)]
    for name, tensor in load_state(out).items():
        expected = exact_mean(states, [2.25, 0.25, 0.25, 0.25], name).float()
        assert max_ulp(tensor, expected) == 0, name
    manifest = read_manifest(out)
    assert manifest.merge.liti == 0.25 and manifest.merge.init is not None
    assert manifest.merge.init.weight == 0.75


@pytest.mark.parametrize("eta", [None, 0.5])
def test_slerp_matches_the_pure_function(
    tmp_path: Path, gpt2_members: list[Path], eta: float | None
) -> None:
    a, b, c, init = gpt2_members
    out = merge([c, a, b], tmp_path / "slerp", method=Method.slerp, init=init, liti=eta)
    states = [load_state(p) for p in (a, b, c)]  # canonical order: sorted paths
    base = load_state(init)
    for name, tensor in load_state(out).items():
        expected = slerp_merge(
            base[name],
            [s[name] for s in states],
            [1 / 3] * 3,
            torch.float64,
            1.0 if eta is None else eta,
        )
        assert torch.allclose(tensor.double(), expected, atol=1e-6, rtol=1e-6), name
    assert read_manifest(out).merge.method == "slerp"


def test_output_is_byte_identical_whatever_the_argument_order(
    tmp_path: Path, gpt2_members: list[Path]
) -> None:
    a, b, c, _ = gpt2_members
    one = merge([a, b, c], tmp_path / "one", weights=(1.0, 2.0, 3.0), max_shard_size=40_000)
    two = merge([c, a, b], tmp_path / "two", weights=(3.0, 1.0, 2.0), max_shard_size=40_000)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_chunked_merge_equals_whole_tensor_merge(tmp_path: Path, gpt2_members: list[Path]) -> None:
    a, b, c, _ = gpt2_members
    whole = load_state(merge([a, b, c], tmp_path / "whole"))
    chunked = load_state(merge([a, b, c], tmp_path / "chunked", chunk_elements=7))
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_dtype_override_casts_once_and_updates_config(
    tmp_path: Path, gpt2_members: list[Path]
) -> None:
    a, b, _, _ = gpt2_members
    out = merge([a, b], tmp_path / "bf16", dtype="bfloat16")
    states = [load_state(p) for p in (a, b)]
    for name, tensor in load_state(out).items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, exact_mean(states, [1, 1], name).float().bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert read_manifest(out).merge.output_dtype == "bfloat16"


def test_provenance_in_manifest_and_every_shard(tmp_path: Path, gpt2_members: list[Path]) -> None:
    a, b, _, _ = gpt2_members
    out = merge([a, b], tmp_path / "p", max_shard_size=40_000)
    manifest = read_manifest(out)
    import hashlib

    for record, src in zip(manifest.merge.inputs, [a, b], strict=True):
        assert record.path == str(src.resolve())
        assert (
            record.files["model.safetensors"]
            == hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
        )
        assert set(record.files) == {
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        }
    assert manifest.merge.tool_version and manifest.merge.config["method"] == "average"
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            meta = fh.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["warm_rm.merge"]) == manifest.merge.model_dump(mode="json")
    assert set(manifest.files) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}


def test_progress_counts_every_byte_read(tmp_path: Path, gpt2_members: list[Path]) -> None:
    a, b, c, _ = gpt2_members
    plan = plan_merge(MergeSpec(inputs=(a, b, c)))
    seen: list[int] = []
    run_merge(plan, tmp_path / "p", progress=seen.append)
    assert sum(seen) == plan.bytes_to_read == 3 * plan.bytes_to_write


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    from safetensors.torch import load_model, save_model

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.score = torch.nn.Linear(3, 1)
            self.decoder = torch.nn.Linear(3, 5, bias=False)
            self.decoder.weight = self.embed.weight  # shared storage

    files = []
    for seed in range(3):
        torch.manual_seed(seed)
        files.append(tmp_path / f"t{seed}.safetensors")
        save_model(Tied(), str(files[-1]))  # stores the shared tensor once
    out = merge(files, tmp_path / "tied")
    model = Tied()
    load_model(model, str(out / "model.safetensors"))
    assert model.decoder.weight.data_ptr() == model.embed.weight.data_ptr()
    states = [load_state(f) for f in files]
    (stored,) = {"embed.weight", "decoder.weight"} & set(states[0])
    assert max_ulp(model.embed.weight.detach(), exact_mean(states, [1, 1, 1], stored).float()) == 0


def test_empty_tensors_merge(tmp_path: Path) -> None:
    # Zero-size tensors (a (0, 4) buffer, a (4, 0) one) are valid safetensors: kept as such.
    from safetensors.torch import save_file

    files = []
    for seed in range(2):
        files.append(tmp_path / f"e{seed}.safetensors")
        state = {
            "score.weight": torch.full((1, 4), float(seed), dtype=torch.bfloat16),
            "empty.rows": torch.empty(0, 4, dtype=torch.bfloat16),
            "empty.cols": torch.empty(4, 0),
        }
        save_file(state, str(files[-1]))
    out = merge(files, tmp_path / "empty")
    merged = load_state(out / "model.safetensors")
    assert merged["empty.rows"].shape == (0, 4) and merged["empty.rows"].dtype == torch.bfloat16
    assert merged["empty.cols"].shape == (4, 0)
    assert merged["score.weight"].tolist() == [[0.5] * 4]


def test_merged_minilm_reward_model_loads_and_scores(tmp_path: Path, minilm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=1)
        members.append(tmp_path / f"mini{seed}")
        model.save_pretrained(members[-1])
        tokenizer.save_pretrained(members[-1])
    out = merge(members, tmp_path / "warm")
    warm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    # Reference: the members' weights averaged by hand and loaded into the same architecture.
    states = [load_state(m) for m in members]
    ref = AutoModelForSequenceClassification.from_pretrained(members[0]).eval()
    ref.load_state_dict({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    batch = AutoTokenizer.from_pretrained(out)(
        ["a good answer", "a bad answer"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        got, want = warm(**batch).logits, ref(**batch).logits
    assert got.shape == (2, 1)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.fixture
def helpers_always(monkeypatch: pytest.MonkeyPatch) -> Counter[bool]:
    """Four cores, every helper averaging from the first chunk on; counts the chunks
    averaged on helper threads (True) and on the merging thread (False)."""
    monkeypatch.setattr(build, "_cores", lambda: 4)
    monkeypatch.setattr(build, "_helpers_now", lambda helpers, hashing: helpers)
    seen: Counter[bool] = Counter()
    lock = threading.Lock()
    average = build._Averager.average

    def counting(self: build._Averager, chunk: build._Chunk) -> torch.Tensor:
        with lock:
            seen[threading.current_thread() is not threading.main_thread()] += 1
        return average(self, chunk)

    monkeypatch.setattr(build._Averager, "average", counting)
    return seen


def test_helper_threads_write_the_same_bytes(
    tmp_path: Path,
    gpt2_members: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    helpers_always: Counter[bool],
) -> None:
    a, b, c, _ = gpt2_members
    options: dict[str, object] = {"chunk_elements": 7, "max_shard_size": 40_000}
    with monkeypatch.context() as alone:
        alone.setattr(build, "_cores", lambda: 1)
        one = merge([a, b, c], tmp_path / "one", **options)
    assert helpers_always[True] == 0
    helpers_always.clear()
    many = merge([a, b, c], tmp_path / "many", **options)
    assert helpers_always[True] > helpers_always[False] > 0  # 3 helpers, 1 merging thread
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in many.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (many / name).read_bytes(), name


def test_a_failing_helper_fails_the_merge_and_leaves_nothing(
    tmp_path: Path,
    gpt2_members: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    helpers_always: Counter[bool],
) -> None:
    a, b, _, _ = gpt2_members
    average = build._Averager.average

    def failing(self: build._Averager, chunk: build._Chunk) -> torch.Tensor:
        if threading.current_thread() is not threading.main_thread():
            raise MergeError(f"{chunk.target.name}: read failed")
        return average(self, chunk)

    monkeypatch.setattr(build._Averager, "average", failing)
    with pytest.raises(MergeError, match="read failed"):
        merge([a, b], tmp_path / "out", chunk_elements=7)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_hashes_started_early_are_used_not_redone(
    tmp_path: Path, gpt2_members: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, _, _ = gpt2_members
    files = [f for m in (a, b) for f in input_files(m)]
    with FileHashes(files) as hashes:
        digests = {f: hashes.get(f) for f in files}  # all hashed before the merge starts
        rehashed: list[Path] = []
        original = hashing._sha256_and_identity

        def counting(path: Path, stop: threading.Event | None = None) -> tuple[str, Any]:
            rehashed.append(path)
            return original(path, stop)

        monkeypatch.setattr(hashing, "_sha256_and_identity", counting)
        run_merge(plan_merge(MergeSpec(inputs=(a, b))), tmp_path / "early", hashes=hashes)
    assert not set(rehashed) & set(files)
    manifest = read_manifest(tmp_path / "early")
    recorded = {Path(r.path) / n: d for r in manifest.merge.inputs for n, d in r.files.items()}
    assert recorded == digests
    late = merge([a, b], tmp_path / "late")
    assert read_manifest(late) == manifest


def test_an_input_rewritten_after_hashing_fails_the_merge(
    tmp_path: Path, gpt2_members: list[Path]
) -> None:
    a, b, _, _ = gpt2_members
    files = [f for m in (a, b) for f in input_files(m)]
    with FileHashes(files) as hashes:
        for f in files:
            hashes.get(f)
        weights = b / "model.safetensors"
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # as a rewrite
        with pytest.raises(MergeError, match=r"model\.safetensors: changed while merging"):
            run_merge(plan_merge(MergeSpec(inputs=(a, b))), tmp_path / "out", hashes=hashes)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_helpers_average_beside_the_hashing_only_once_it_is_done() -> None:
    hashing: Future[None] = Future()
    assert build._helpers_now(3, hashing) == 2
    assert build._helpers_now(1, hashing) == 0
    hashing.set_result(None)
    assert build._helpers_now(3, hashing) == 3
    assert build._helpers_now(1, hashing) == 1


def test_run_on_all_cancels_the_helpers_share_when_this_thread_is_interrupted(
    gpt2_members: list[Path],
) -> None:
    plan = plan_merge(MergeSpec(inputs=tuple(gpt2_members[:2])))
    cancelled = threading.Event()
    helper_saw_cancel: list[bool] = []

    def work() -> None:
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        helper_saw_cancel.append(cancelled.wait(10))  # a helper hashing until cancelled

    with TensorReader() as reader:
        averagers = build._Averagers(build._Context(plan, reader, lambda n: None), 2, lambda: 2)
        try:
            with pytest.raises(KeyboardInterrupt):
                averagers.run_on_all(work, cancelled.set)
        finally:
            averagers.close()
    assert helper_saw_cancel == [True, True]
