"""`compile`: the transformers backend through torch.compile (Inductor, frozen weights).

The HTTP suite runs over compiled servers too (test_service_api.py, "*-compiled"); these
tests hold what is particular to compiling: both graphs exist before serving, no batch
shape compiles another, a model that cannot compile is a clear load error.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor
from pydantic import ValidationError
from tiny_models import PAD_ID
from torch._dynamo import eval_frame
from torch._dynamo.utils import counters
from transformers import AutoModelForSequenceClassification

from service.backends.transformers import StanceHold, TransformersBackend, compile_failure
from service.loader import LoadError, load_model
from service.settings import Settings

# (items, tokens) of every batch: one item and several, one token and many, batch and
# length equal, the longest item first and last.
SHAPES = [(1, 1), (1, 9), (4, 1), (3, 3), (2, 7), (6, 2), (5, 31), (1, 2)]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Forget graphs other tests compiled for the same code (a compiled server elsewhere in
    the session), so that each test here sees only its own."""
    torch._dynamo.reset()


def compiled_backend(model_dir: Path) -> TransformersBackend:
    """The tiny model, compiled on the CPU."""
    return TransformersBackend(
        model_dir,
        device="cpu",
        dtype="float32",
        max_length=64,
        pad_token_id=PAD_ID,
        trust_remote_code=False,
        compile=True,
    )


def batch(items: int, tokens: int) -> list[list[int]]:
    """Token ids of `items` items, the first `tokens` long and the others shorter."""
    return [[5 + (3 * i + 7 * t) % 90 for t in range(max(1, tokens - i))] for i in range(items)]


# Items whose tokens include the pad id: a decoder's reward is read at each item's last
# token, found from the attention mask, never through the pad id.
WITH_PAD_IDS = [[7, 9, PAD_ID], [PAD_ID], [12, PAD_ID, 14, 15], [PAD_ID, PAD_ID]]


@pytest.mark.parametrize("fixture", ["gpt2_rm", "bert_rm"])
def test_compiled_forwards_match_eager_ones_and_never_recompile(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    eager = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    eager.config.pad_token_id = None  # one unpadded item: transformers reads its last token
    backend = compiled_backend(model_dir)
    assert backend.info.compiled and backend.stance == "eager_on_recompile"
    backend.stance = "fail_on_recompile"  # any shape needing a new graph raises
    frames = counters["stats"]["unique_graphs"]  # both graphs are compiled by now
    for sequences in [batch(items, tokens) for items, tokens in SHAPES] + [WITH_PAD_IDS]:
        items = len(sequences)
        got = backend.forward(sequences)
        with torch.inference_mode():  # each item alone, unpadded
            want = [eager(input_ids=torch.tensor([s])).logits[0].tolist() for s in sequences]
        assert got.shape == (items, 1)
        assert got[:, 0].tolist() == pytest.approx([w[0] for w in want], abs=1e-5)
    assert counters["stats"]["unique_graphs"] == frames, "a batch shape compiled a new graph"


def test_a_shape_outside_both_graphs_runs_eagerly_instead_of_compiling(gpt2_rm: Path) -> None:
    eager = AutoModelForSequenceClassification.from_pretrained(gpt2_rm).eval()
    backend = compiled_backend(gpt2_rm)
    backend.min_length = 1  # a 1-token batch now reaches the model: a shape no graph covers
    frames = counters["stats"]["unique_graphs"]
    got = backend.forward([[42]])
    with torch.inference_mode():
        want = eager(input_ids=torch.tensor([[42]])).logits[0, 0].item()
    assert got[0, 0] == pytest.approx(want, abs=1e-5)
    assert counters["stats"]["unique_graphs"] == frames
    backend.stance = "fail_on_recompile"
    with pytest.raises(RuntimeError, match="recompil"):  # the shape did need a new graph
        backend.forward([[42]])


def test_a_model_that_cannot_compile_is_a_clear_load_error(gpt2_rm: Path) -> None:
    settings = Settings(model=gpt2_rm, compile=True, warmup=False, batch_overhead_tokens=0)
    # No cached kernels either: every kernel must go through the (missing) compiler.
    broken = {"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}
    with inductor.patch(broken), pytest.raises(LoadError) as failed:
        load_model(settings)
    message = str(failed.value)
    assert message.startswith("compile: torch.compile failed (InvalidCxxCompiler: No working C++")
    assert message.endswith("or install a C++ compiler (CPU) or Triton (CUDA)")
    assert "\n" not in message


@pytest.mark.usefixtures("restore_torch_threads")
def test_compiled_forwards_run_side_by_side_as_eager_ones_do(
    gpt2_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[int] = []  # graphs there are once the backend has compiled
    compile_now = TransformersBackend._compile_now

    def recording(backend: TransformersBackend, counts: Sequence[int]) -> None:
        compile_now(backend, counts)
        compiled.append(counters["stats"]["unique_graphs"])

    monkeypatch.setattr(TransformersBackend, "_compile_now", recording)
    settings = Settings(model=gpt2_rm, compile=True, torch_threads=2, device="cpu")
    loaded = load_model(settings)  # compiles, then times warm-up batches on one thread
    assert loaded.backend.info.compiled
    assert loaded.cores is not None and loaded.cores.workers == 2  # one per torch thread
    assert loaded.cores.counts == (1, 2)
    assert torch.get_num_threads() == 2  # warm-up gave the loading thread its count back
    assert counters["stats"]["unique_graphs"] == compiled[0], "warm-up compiled a graph"
    backend = loaded.backend
    assert isinstance(backend, TransformersBackend)
    backend.stance = "fail_on_recompile"
    eager = AutoModelForSequenceClassification.from_pretrained(gpt2_rm).eval()
    work = [batch(items, tokens) for items, tokens in SHAPES if tokens > 1] * 3
    with torch.inference_mode():
        want = [eager(input_ids=torch.tensor([s])).logits[0, 0].item() for b in work for s in b]

    def forwards(first: int, threads: int) -> list[tuple[int, list[float]]]:
        done = []
        for k in range(first, len(work), 2):  # every other batch
            done.append((k, backend.forward(work[k], threads=threads)[:, 0].tolist()))
        return done

    with ThreadPoolExecutor(2) as pool:  # two forwards at once, one thread each
        runs = [pool.submit(forwards, 0, 1), pool.submit(forwards, 1, 1)]
        done = [result for run in runs for result in run.result()]
    got = [reward for _, rewards in sorted(done) for reward in rewards]
    assert got == pytest.approx(want, abs=1e-5)
    alone = sorted(forwards(0, 2) + forwards(1, 2))  # one at a time, on every thread
    assert [reward for _, rewards in alone for reward in rewards] == pytest.approx(want, abs=1e-5)
    assert dynamo_stance() == "default"  # the stance is restored once both are done


def dynamo_stance() -> str:
    """The stance dynamo applies now (process-wide)."""
    stance: str = eval_frame._stance.stance
    return stance


def test_forwards_side_by_side_hold_one_stance_until_the_last_ends() -> None:
    hold = StanceHold()
    with ExitStack() as second:
        with ExitStack() as first:  # the first forward starts, then the second
            first.enter_context(hold.hold("eager_on_recompile"))
            second.enter_context(hold.hold("eager_on_recompile"))
        assert dynamo_stance() == "eager_on_recompile"  # the first ended; the second runs on
    assert dynamo_stance() == "default"
    held = hold.hold("eager_on_recompile")
    with held, pytest.raises(RuntimeError, match="asked while"), hold.hold("fail_on_recompile"):
        pass
    assert dynamo_stance() == "default"


def test_a_failure_outside_the_compiler_is_not_blamed_on_the_toolchain() -> None:
    error = compile_failure(RuntimeError("out of memory\nwhile allocating 2 GiB"))
    assert str(error) == "compile: the first compiled forward failed (RuntimeError: out of memory)"


def test_compile_with_the_vllm_backend_is_refused() -> None:
    with pytest.raises(ValidationError, match="compile: only applies to backend 'transformers'"):
        Settings.model_validate({"compile": True, "backend": "vllm"})
    assert Settings(compile=True, model_workers=2).compile
