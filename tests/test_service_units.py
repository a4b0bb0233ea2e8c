"""Unit tests of the reward service's pure parts, against hand-computed expectations."""

from __future__ import annotations

import copy
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp
from transformers import AutoTokenizer

from merger.formatting import DEFAULT_SEPARATOR
from service import cli, metrics
from service.batching import BatchLimits, efficiency, form_batch, padded_tokens
from service.encoding import Encoder
from service.errors import STATUS, ErrorType, ServiceError, envelope
from service.metrics import ThreadCPU, ThreadStat, read_thread_stat
from service.protocol import GetRewardRequest, Item, Message, RerankRequest, ScoreRequest
from service.ranking import rank
from service.settings import Settings


@pytest.fixture(autouse=True)
def _no_warm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate every test from WARM_* variables of the surrounding environment."""
    for name in [n for n in os.environ if n.startswith("WARM_")]:
        monkeypatch.delenv(name)


# --- batching -------------------------------------------------------------------------------


def test_padded_tokens_and_efficiency() -> None:
    assert padded_tokens([]) == 0
    assert padded_tokens([3, 5, 2]) == 15  # 5 * 3
    assert efficiency([3, 5, 2], 5) == 0.5  # (3+5+2) / (5 + 15) = 10/20
    assert efficiency([4, 4], 0) == 1.0  # 8 / 8
    assert efficiency([], 0) == 0.0  # zero cost -> 0, not a division error


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ((0, 10, 0.0), "max_batch_size"),
        ((1, 0, 0.0), "max_batch_tokens"),
        ((1, 10, -1.0), "overhead_tokens"),
    ],
)
def test_batch_limits_invalid(limits: tuple[int, int, float], expected: str) -> None:
    with pytest.raises(ValueError, match="invalid batch limits") as info:
        BatchLimits(*limits)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("lengths", "limits", "expected"),
    [
        # Nothing waiting; a lone item.
        ([], (4, 100, 0.0), []),
        ([5], (4, 100, 0.0), [0]),
        # Oldest (50) exceeds the 40-token budget: every window holds it -> it goes alone.
        ([50, 10, 10], (4, 40, 0.0), [0]),
        # Uniform 8s, overhead 0: every window scores 1.0 -> the largest (size 3), by age.
        ([8, 8, 8, 8, 8], (3, 1000, 0.0), [0, 1, 2]),
        ([8, 8, 8, 8, 8], (10, 1000, 0.0), [0, 1, 2, 3, 4]),
        # Token budget 24: count * 8 <= 24 -> count 3.
        ([8, 8, 8, 8, 8], (10, 24, 0.0), [0, 1, 2]),
        # Size 4 of ten uniform items.
        ([4] * 10, (4, 1000, 0.0), [0, 1, 2, 3]),
        # Overhead 0: {10} = 10/10 = 1 beats {5,10} = 15/20 = 0.75.
        ([10, 5], (4, 100, 0.0), [0]),
        # Oldest short: {5} = 5/5 = 1 beats {5,10} = 15/20.
        ([5, 10], (4, 100, 0.0), [0]),
        # Overhead 100: {10} = 10/110 = 0.091 < {5,10} = 15/120 = 0.125; sorted by length.
        ([10, 5], (4, 100, 100.0), [1, 0]),
        # Overhead 0: {10} = 1 > {8,10} = 18/20 > {6,8,10} = 24/30.
        ([10, 6, 8], (4, 100, 0.0), [0]),
        # Overhead 1000: 10/1010 = .0099 < 18/1020 = .0176 < 24/1030 = .0233.
        ([10, 6, 8], (4, 100, 1000.0), [1, 2, 0]),
        # Same, size 2: best of {10}, {8,10} -> {8,10}.
        ([10, 6, 8], (2, 100, 1000.0), [2, 0]),
        # Same, 20 tokens: 10 * count <= 20 -> count <= 2 -> {8,10}.
        ([10, 6, 8], (4, 20, 1000.0), [2, 0]),
    ],
)
def test_form_batch_limits_and_overhead(
    lengths: list[int], limits: tuple[int, int, float], expected: list[int]
) -> None:
    assert form_batch(lengths, BatchLimits(*limits)) == expected


def test_form_batch_groups_by_length() -> None:
    # Sorted: 10(1) 10(3) 100(0) 100(2) 100(4); the oldest is at sorted position 2; overhead 20.
    # Windows [start, stop) holding position 2, score = sum / (20 + max * count):
    #   (0,3) 120/320=.375  (0,4) 220/420=.524  (0,5) 320/520=.615
    #   (1,3) 110/220=.500  (1,4) 210/320=.656  (1,5) 310/420=.738
    #   (2,3) 100/120=.833  (2,4) 200/220=.909  (2,5) 300/320=.9375  <- best: the three 100s
    limits = BatchLimits(max_batch_size=5, max_batch_tokens=500, overhead_tokens=20)
    assert form_batch([100, 10, 100, 10, 100], limits) == [0, 2, 4]
    # Sorted: 10(0) 10(2) 10(4) 100(1) 100(3); oldest at position 0, windows (0, stop):
    #   {10} 10/30=.333  {10,10} 20/40=.5  {10x3} 30/50=.6  +100: 130/420=.31  +100: 230/520=.44
    assert form_batch([10, 100, 10, 100, 10], limits) == [0, 2, 4]


def test_form_batch_ties_go_to_larger_then_shorter() -> None:
    # Overhead 4: {4} = 4/(4+4) = 0.5 and {2,4} = 6/(4+8) = 0.5 tie -> larger batch.
    assert form_batch([4, 2], BatchLimits(2, 100, 4.0)) == [1, 0]
    # Overhead 5, sorted 4(2) 5(0) 10(1): {5} = 5/10 = .5, {4,5} = 9/(5+10) = .6,
    # {5,10} = 15/(5+20) = .6, {4,5,10} = 19/(5+30) = .543 -> the tied pair of shorter items.
    assert form_batch([5, 10, 4], BatchLimits(3, 100, 5.0)) == [2, 0]


def test_form_batch_sorted_by_length_then_age() -> None:
    # Overhead 1000, sorted 3(1) 3(3) 7(0) 7(2): all four = 20/(1000+28) = .01946 beats
    # 17/1021 = .01665 (3,7,7) and 14/1014 = .0138 (7,7) -> everything, by length then age.
    assert form_batch([7, 3, 7, 3], BatchLimits(4, 1000, 1000.0)) == [1, 3, 0, 2]


def _reference_batch(lengths: list[int], limits: BatchLimits) -> list[int]:
    """Brute force of the documented rule over windows of the length-sorted items."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    anchor = order.index(0)
    best: tuple[float, int, int] | None = None
    best_window = [0]
    for start in range(anchor + 1):
        for stop in range(anchor + 1, len(order) + 1):
            window = [lengths[i] for i in order[start:stop]]
            too_big = len(window) > limits.max_batch_size
            if too_big or padded_tokens(window) > limits.max_batch_tokens:
                continue
            key = (efficiency(window, limits.overhead_tokens), len(window), -start)
            if best is None or key > best:
                best, best_window = key, order[start:stop]
    return best_window


@pytest.mark.parametrize("seed", range(5))
def test_form_batch_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        lengths = [rng.choice([3, 7, 20, 64, 65, 128]) for _ in range(rng.randint(1, 12))]
        limits = BatchLimits(rng.randint(1, 6), rng.choice([50, 128, 300]), rng.choice([0, 30]))
        batch = form_batch(lengths, limits)
        assert 0 in batch and len(batch) <= limits.max_batch_size
        if len(batch) > 1:
            assert padded_tokens([lengths[i] for i in batch]) <= limits.max_batch_tokens
        assert batch == _reference_batch(lengths, limits), (lengths, limits)


# --- ranking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards", "order", "mean", "std", "advantages"),
    [
        # mean 2; sum sq dev 1+1+0 = 2; std sqrt(2/2) = 1; adv = r - 2.
        ([1.0, 3.0, 2.0], [1, 2, 0], 2.0, 1.0, [-1.0, 1.0, 0.0]),
        # mean 3.5; sum sq 4 * 1.5^2 = 9; std sqrt(9/3) = sqrt 3; adv +-1.5/sqrt 3 = +-sqrt(3/4).
        ([2, 5, 2, 5], [1, 3, 0, 2], 3.5, math.sqrt(3), [-math.sqrt(0.75), math.sqrt(0.75)] * 2),
        # mean 2; sum sq 4+4 = 8; std sqrt(8/1) = 2.828; adv +-2/2.828 = +-sqrt(1/2).
        ([0.0, 4.0], [1, 0], 2.0, math.sqrt(8), [-math.sqrt(0.5), math.sqrt(0.5)]),
        # mean -2; sum sq 1+1 = 2; std sqrt 2; adv +-1/sqrt 2 = +-sqrt(1/2).
        ([-1.0, -3.0], [0, 1], -2.0, math.sqrt(2), [math.sqrt(0.5), -math.sqrt(0.5)]),
        # One candidate: std 0, advantage 0.
        ([3.5], [0], 3.5, 0.0, [0.0]),
        # All equal: std 0, advantages 0, order = request order.
        ([2.0, 2.0, 2.0], [0, 1, 2], 2.0, 0.0, [0.0, 0.0, 0.0]),
    ],
)
def test_rank(
    rewards: list[float], order: list[int], mean: float, std: float, advantages: list[float]
) -> None:
    ranking = rank(rewards)
    assert ranking.order == order
    assert ranking.mean == pytest.approx(mean)
    assert ranking.std == pytest.approx(std)
    assert ranking.advantages == pytest.approx(advantages)


def test_rank_empty() -> None:
    with pytest.raises(ValueError, match="at least one"):
        rank([])


# --- protocol -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "n_chars"),
    [
        ({"text": "hello"}, 5),
        ({"prompt": "abc", "response": "de"}, 5),
        ({"prompt": "", "response": ""}, 0),
        ({"messages": [{"role": "system", "content": "ab"}, {"role": "user", "content": "c"}]}, 3),
    ],
)
def test_item_valid_forms(body: dict[str, Any], n_chars: int) -> None:
    assert Item.model_validate(body).n_chars() == n_chars


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one of"),
        ({"text": "a", "prompt": "p", "response": "r"}, "exactly one of"),
        ({"text": "a", "messages": [{"role": "user", "content": "x"}]}, "exactly one of"),
        ({"prompt": "p"}, "response is missing"),
        ({"response": "r"}, "prompt is missing"),
        ({"text": "a", "score": 1}, "Extra inputs"),
        ({"messages": []}, "at least 1"),
        ({"messages": [{"role": "", "content": "x"}]}, "at least 1 character"),
        ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "Extra inputs"),
    ],
)
def test_item_rejected(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Item.model_validate(body)


def test_score_request() -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        ScoreRequest.model_validate({"items": []})
    with pytest.raises(ValidationError, match="truncation_side"):
        ScoreRequest.model_validate({"items": [{"text": "a"}], "truncation_side": "middle"})
    request = ScoreRequest.model_validate({"items": [{"text": "a"}], "truncation_side": "right"})
    assert request.truncation_side == "right" and request.items[0].text == "a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"candidates": ["a"]}, "exactly one of prompt, messages or query"),
        (
            {"prompt": "p", "messages": [{"role": "user", "content": "p"}], "candidates": ["a"]},
            "exactly one of prompt, messages or query",
        ),
        ({"query": "q", "prompt": "p", "documents": ["a"]}, "exactly one of prompt, messages"),
        ({"prompt": "p"}, "exactly one of candidates or documents"),
        ({"query": "q", "candidates": ["a"], "documents": ["b"]}, "exactly one of candidates"),
        ({"query": "q", "documents": ["a"], "top_k": 1, "top_n": 1}, "at most one of top_k"),
        ({"query": "q", "documents": [{"title": "t"}]}, "text"),
        ({"query": "q", "documents": ["a"], "top_n": -1}, "greater than or equal to 0"),
        ({"prompt": "p", "candidates": []}, "at least 1"),
        ({"prompt": "p", "candidates": ["a"], "top_k": 0}, "greater than or equal to 1"),
        ({"prompt": "p", "candidates": ["a"], "extra": True}, "Extra inputs"),
    ],
)
def test_rerank_request_rejected(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RerankRequest.model_validate(body)


def test_rerank_request_items() -> None:
    by_prompt = RerankRequest(prompt="Q", candidates=["a", "b"], top_k=1)
    assert by_prompt.items() == [Item(prompt="Q", response="a"), Item(prompt="Q", response="b")]
    chat = [Message(role="system", content="S"), Message(role="user", content="Q")]
    by_chat = RerankRequest(messages=chat, candidates=["a", "b"])
    items = by_chat.items()
    assert [[(m.role, m.content) for m in item.messages or []] for item in items] == [
        [("system", "S"), ("user", "Q"), ("assistant", "a")],
        [("system", "S"), ("user", "Q"), ("assistant", "b")],
    ]
    assert len(by_chat.messages or []) == 2  # the request's own chat is not mutated


def test_get_reward_request_allows_extra() -> None:
    request = GetRewardRequest.model_validate({"query": ["q"], "labels": [1], "custom": "x"})
    assert request.query == ["q"] and request.labels == [1]
    assert request.model_extra == {"custom": "x"}
    with pytest.raises(ValidationError):
        GetRewardRequest.model_validate({"query": []})


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


# --- errors ---------------------------------------------------------------------------------


def test_status_table() -> None:
    names = "INVALID_REQUEST UNAUTHORIZED NOT_FOUND METHOD_NOT_ALLOWED PAYLOAD_TOO_LARGE "
    names += "OVERLOADED NOT_READY DEADLINE_EXCEEDED BACKEND_ERROR INTERNAL CLIENT_CLOSED"
    statuses = [422, 401, 404, 405, 413, 429, 503, 504, 500, 500, 499]
    assert {ErrorType[n]: s for n, s in zip(names.split(), statuses, strict=True)} == STATUS


@pytest.mark.parametrize(
    ("retry_after", "header"),
    # ceil, at least 1: ceil(.2)=1, ceil(1.0)=1, ceil(1.01)=2, ceil(7.5)=8, max(1, ceil(0))=1.
    [(0.2, "1"), (1.0, "1"), (1.01, "2"), (7.5, "8"), (0.0, "1")],
)
def test_retry_after_header(retry_after: float, header: str) -> None:
    error = ServiceError(ErrorType.OVERLOADED, "busy", retry_after=retry_after)
    assert error.status == 429
    assert error.headers() == {"Retry-After": header}


def test_error_headers_and_envelope() -> None:
    unauthorized = ServiceError(ErrorType.UNAUTHORIZED, "no key")
    assert unauthorized.headers() == {"WWW-Authenticate": "Bearer"}
    assert unauthorized.status == 401 and str(unauthorized) == "no key"
    assert ServiceError(ErrorType.INTERNAL, "boom").headers() == {}
    assert envelope(ErrorType.NOT_READY, "loading") == {
        "error": {"type": "not_ready", "message": "loading"}
    }


# --- encoding -------------------------------------------------------------------------------

LONG = " ".join(
    [
        "The assistant explains the question clearly and politely.",
        "A helpful model summarises a short poem about the quiet sea.",
        "The reward model ranks two responses and prefers the honest one.",
    ]
)


@pytest.fixture(scope="module")
def tiny_tok(tiny_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def minilm_tok(minilm_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.mark.parametrize("name", ["tiny_tok", "minilm_tok"])
def test_encoder_short_texts_untouched(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    texts = ["The answer ranks", "Our policy refuses a harmful request."]
    encoded = Encoder(tok, max_length=64, separator=DEFAULT_SEPARATOR).encode_texts(texts, "left")
    assert [e.ids for e in encoded] == [tok(t)["input_ids"] for t in texts]
    assert [e.truncated for e in encoded] == [False, False]


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_truncates_tiny(tiny_tok: Any, side: str) -> None:
    full = tiny_tok(LONG)["input_ids"]
    assert len(full) > 8
    encoder = Encoder(tiny_tok, max_length=8, separator=DEFAULT_SEPARATOR)
    long, short = encoder.encode_texts([LONG, "The answer"], side)
    assert long.truncated and len(long.ids) == 8
    # No special tokens: 'left' keeps the last 8 ids, 'right' the first 8.
    assert long.ids == (full[-8:] if side == "left" else full[:8])
    assert not short.truncated and short.ids == tiny_tok("The answer")["input_ids"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_truncates_minilm_keeping_specials(minilm_tok: Any, side: str) -> None:
    full = minilm_tok(LONG)["input_ids"]
    cls_id, sep_id = minilm_tok.cls_token_id, minilm_tok.sep_token_id
    assert full[0] == cls_id and full[-1] == sep_id and len(full) > 8
    (long,) = Encoder(minilm_tok, max_length=8, separator="\n\n").encode_texts([LONG], side)
    assert long.truncated and len(long.ids) == 8
    # [CLS] + 6 content ids + [SEP]: the content's tail for 'left', its head for 'right'.
    body = full[1:-1]
    assert long.ids == [cls_id, *(body[-6:] if side == "left" else body[:6]), sep_id]


def test_encoder_does_not_mutate_tokenizer(tiny_tok: Any) -> None:
    before = (tiny_tok.truncation_side, tiny_tok.model_max_length)
    Encoder(tiny_tok, max_length=4, separator="\n\n").encode_texts([LONG], "left")
    assert (tiny_tok.truncation_side, tiny_tok.model_max_length) == before


@pytest.mark.parametrize("separator", [DEFAULT_SEPARATOR, " ||| "])
def test_render_without_chat_template(tiny_tok: Any, separator: str) -> None:
    encoder = Encoder(tiny_tok, max_length=64, separator=separator)
    assert not encoder.chat_template
    assert encoder.render(Item(prompt="Q?", response="A.")) == f"Q?{separator}A."
    chat = Item(
        messages=[Message(role="user", content="Q?"), Message(role="assistant", content="A.")]
    )
    assert encoder.render(chat) == f"Q?{separator}A."
    assert encoder.render(Item(text="raw")) == "raw"


def _with_template(tok: Any, template: str) -> Any:
    templated = copy.deepcopy(tok)
    templated.chat_template = template
    return templated


def test_render_with_chat_template(tiny_tok: Any) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    encoder = Encoder(_with_template(tiny_tok, template), max_length=64, separator=" | ")
    assert encoder.chat_template
    assert encoder.render(Item(prompt="Q", response="A")) == "[user]Q[assistant]A"
    chat = [Message(role="system", content="S"), Message(role="user", content="Q")]
    assert encoder.render(Item(messages=chat)) == "[system]S[user]Q"
    assert encoder.render(Item(text="raw")) == "raw"  # raw text bypasses the template


def test_empty_render_is_invalid_request(tiny_tok: Any, minilm_tok: Any) -> None:
    assert tiny_tok("")["input_ids"] == []  # no special tokens added: "" is truly empty
    encoder = Encoder(tiny_tok, max_length=64, separator="\n\n")
    with pytest.raises(ServiceError) as info:
        encoder.encode([Item(text="The answer"), Item(text="")], "left")
    assert info.value.type is ErrorType.INVALID_REQUEST and info.value.status == 422
    assert "items[1]" in info.value.message and "no tokens" in info.value.message
    # MiniLM adds [CLS] [SEP], so "" is two tokens and is scored.
    (empty,) = Encoder(minilm_tok, max_length=64, separator="\n\n").encode([Item(text="")], "left")
    assert empty.ids == [minilm_tok.cls_token_id, minilm_tok.sep_token_id]
    assert not empty.truncated


def test_render_all_failure_names_item(tiny_tok: Any) -> None:
    template = (
        "{% if messages[0]['content'] == 'bad' %}{{ raise_exception('bad prompt') }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    encoder = Encoder(_with_template(tiny_tok, template), max_length=64, separator="\n\n")
    items = [Item(text="fine"), Item(prompt="ok", response="r"), Item(prompt="bad", response="r")]
    assert encoder.render_all(items[:2]) == ["fine", "ok"]
    with pytest.raises(ServiceError) as info:
        encoder.render_all(items)
    assert info.value.type is ErrorType.INVALID_REQUEST
    assert info.value.message.startswith("items[2]: cannot render") and "bad prompt" in str(
        info.value
    )


def burn_cpu(seconds: float) -> None:
    """Spin until this thread has used `seconds` of CPU."""
    while time.thread_time() < seconds:
        pass


def test_read_thread_stat_reads_the_threads_own_clock() -> None:
    tick = 1 / os.sysconf("SC_CLK_TCK")
    burn_cpu(0.2)
    before = time.thread_time()
    stat = read_thread_stat(threading.get_native_id())
    after = time.thread_time()
    # /proc rounds user and system time down to ticks, and may lag by a scheduler tick.
    assert before - 3 * tick <= stat.cpu_seconds <= after
    assert read_thread_stat(threading.get_native_id()).started == stat.started


def wait_gone(thread: threading.Thread) -> None:
    """Join `thread` and wait for the OS to remove it (join returns a little before)."""
    thread.join()
    deadline = time.monotonic() + 10
    while Path(f"/proc/self/task/{thread.native_id}").exists():
        assert time.monotonic() < deadline, "the thread never left /proc"
        time.sleep(0.01)


def test_thread_cpu_sums_roles_and_never_falls_when_a_thread_ends() -> None:
    cpu = ThreadCPU()
    burnt = threading.Barrier(4)
    end = [threading.Event() for _ in range(3)]

    def worker(role: str, seconds: float, k: int) -> None:
        cpu.register(role)
        cpu.register(role)  # again, same role: nothing changes
        burn_cpu(seconds)
        burnt.wait()
        end[k].wait()

    jobs = (("model", 0.2), ("model", 0.1), ("tokenizer", 0.1))
    threads = [threading.Thread(target=worker, args=(*job, k)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    burnt.wait()
    live = totals(cpu)
    assert live["model"] == pytest.approx(0.3, abs=0.05)  # two threads: 0.2 + 0.1
    assert live["tokenizer"] == pytest.approx(0.1, abs=0.05)
    end[0].set()  # one model thread ends: what it used stays counted
    wait_gone(threads[0])
    assert totals(cpu)["model"] >= live["model"]
    for e, t in zip(end, threads, strict=True):
        e.set()
        wait_gone(t)
    assert totals(cpu) == pytest.approx(live, abs=0.03)  # every thread gone: last readings


def totals(cpu: ThreadCPU) -> dict[str, float]:
    return {s.labels["role"]: s.value for f in cpu.collect() for s in f.samples}


def test_thread_cpu_refuses_a_second_role_and_ignores_a_reused_thread_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = ThreadCPU()
    # What /proc says at each call: two registrations, then two scrapes.
    stats = [ThreadStat(0.0, 100), ThreadStat(0.1, 100), ThreadStat(5.0, 100), ThreadStat(7.0, 200)]
    readings = iter(stats)
    monkeypatch.setattr(metrics, "read_thread_stat", lambda tid: next(readings))
    cpu.register("event_loop")  # started at tick 100
    with pytest.raises(ValueError, match="already counted as event_loop"):
        cpu.register("model")
    assert totals(cpu) == {"event_loop": 5.0}
    # The id now names another thread (started at tick 200, used 7 s): not counted.
    assert totals(cpu) == {"event_loop": 5.0}


def test_thread_cpu_is_empty_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(tid: int) -> ThreadStat:
        raise FileNotFoundError(f"/proc/self/task/{tid}/stat")

    monkeypatch.setattr(metrics, "read_thread_stat", no_proc)
    cpu = ThreadCPU()
    cpu.register("event_loop")
    assert totals(cpu) == {}
