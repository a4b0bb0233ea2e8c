"""Drop-in endpoints, replayed byte for byte as their clients send them, against a live server.

Each client's request is rebuilt as its published source builds it (aiohttp's `json=`:
`json.dumps(payload)` with default separators, UTF-8, and aiohttp's headers), posted over
real HTTP, and the response read the way that client reads it:
- verl 0.9.1's reward loop (vLLM engine): POST /classify {"model", "input", "use_activation"},
  reads data[-1].probs[-1]; older verl sends "activation"; its SGLang path posts
  /v1/embeddings and reads data[-1].embedding[-1];
- vLLM's pooling API: /classify and /pooling with batches, token ids, chats, truncation;
- OpenRLHF 0.11.2 (SingleTurnAgentExecutor): POST /get_reward {"query", "prompts", "labels"};
- TEI's /predict; Cohere/Jina/vLLM's rerank shape on /v1/rerank; /score.
The model is a tiny Llama 3 RM (no pad token, a template that writes BOS and ends each turn
with <|eot_id|>): every reward must equal /v1/score's for the same input (1e-5).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from families import make_family_rm, tokenizer_of
from live import Live, live_server
from prometheus_client import CONTENT_TYPE_LATEST
from transformers import AutoModelForSequenceClassification

from service.compat import ClassificationResponse, PoolingResponse
from service.protocol import RerankResponse, ScoreResponse, sigmoid
from service.settings import Settings

CHAT = [
    {"role": "user", "content": "why is the sky blue"},
    {"role": "assistant", "content": "rayleigh scattering explains the sky"},
]
OTHER = [
    {"role": "user", "content": "weather today"},
    {"role": "assistant", "content": "the weather today is sunny"},
]
# aiohttp 3.x's request headers, in its order (OpenRLHF and verl both post through it).
AIOHTTP_HEADERS = {
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate",
    "User-Agent": "Python/3.11 aiohttp/3.14.5",
    "Content-Type": "application/json",
}


def aiohttp_body(payload: dict[str, Any]) -> bytes:
    """What aiohttp's `session.post(url, json=payload)` sends: default json.dumps, UTF-8."""
    return json.dumps(payload).encode("utf-8")


@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama 3 reward model with its family's tokenizer and template."""
    return make_family_rm(tmp_path_factory.mktemp("llama3_rm"), "llama3", seed=7)


@pytest.fixture(scope="module")
def live(llama_rm: Path) -> Iterator[Live]:
    """The Llama 3 RM served with default settings."""
    with live_server(Settings.model_validate({"model": llama_rm})) as running:
        yield running


def post(live: Live, path: str, body: bytes) -> httpx.Response:
    """POST raw bytes with aiohttp's headers."""
    with live.client() as client:
        return client.post(path, content=body, headers=AIOHTTP_HEADERS)


def v1_score(live: Live, items: list[dict[str, Any]]) -> list[float]:
    """The rewards /v1/score gives the same items: the reference of every endpoint."""
    with live.client() as client:
        response = client.post("/v1/score", json={"items": items})
    assert response.status_code == 200, response.text
    return [r.reward for r in ScoreResponse.model_validate(response.json()).results]


def template(messages: list[dict[str, str]]) -> str:
    """The RM's chat template applied as verl and OpenRLHF apply it."""
    text = tokenizer_of("llama3").apply_chat_template(messages, tokenize=False)
    assert isinstance(text, str)
    return text


def verl_input(messages: list[dict[str, str]]) -> str:
    """verl's reward-loop input: the RM's template, add_generation_prompt False, leading BOS
    string removed (vLLM adds it back)."""
    bos = tokenizer_of("llama3").bos_token
    text = template(messages)
    return text[len(bos) :] if text.startswith(bos) else text


def test_verl_classify_replay(live: Live, llama_rm: Path) -> None:
    payload = {"model": str(llama_rm), "input": verl_input(CHAT), "use_activation": False}
    response = post(live, "/classify", aiohttp_body(payload))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    output = response.json()
    rm_score = output["data"][-1]["probs"][-1]  # verl: compute_score_disrm
    assert rm_score == pytest.approx(v1_score(live, [{"messages": CHAT}])[0], abs=1e-5)
    # The same reward as a direct forward of the template's own ids (one BOS, EOS last).
    model = AutoModelForSequenceClassification.from_pretrained(llama_rm).eval()
    ids = tokenizer_of("llama3").apply_chat_template(CHAT, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.inference_mode():
        direct = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert rm_score == pytest.approx(direct, abs=1e-5)
    body = ClassificationResponse.model_validate(output)
    assert body.object == "list" and body.id.startswith("classify-") and len(body.id) == 25
    assert body.model == llama_rm.name  # the model id, as /v1/models reports it
    assert body.data[0].label == "LABEL_0" and body.data[0].num_classes == 1
    assert body.usage.prompt_tokens == body.usage.total_tokens == len(ids)


def test_classify_activation_defaults_to_vllms_sigmoid(live: Live) -> None:
    text = verl_input(CHAT)
    raw = v1_score(live, [{"messages": CHAT}])[0]
    answers = {}
    for name, extra in {
        "default": {},
        "use_activation": {"use_activation": True},
        "activation_false": {"activation": False},  # verl before 0.9: the older field name
        "use_activation_wins": {"use_activation": False, "activation": True},
    }.items():
        response = post(live, "/classify", aiohttp_body({"input": text, **extra}))
        assert response.status_code == 200, response.text
        answers[name] = response.json()["data"][0]["probs"][0]
    assert answers["default"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(-raw)).item()))
    assert answers["use_activation"] == answers["default"]
    assert answers["activation_false"] == pytest.approx(raw, abs=1e-5)
    assert answers["use_activation_wins"] == pytest.approx(raw, abs=1e-5)


def test_classify_batches_token_ids_chats_and_truncation(live: Live, llama_rm: Path) -> None:
    texts = [verl_input(CHAT), verl_input(OTHER)]
    want = v1_score(live, [{"messages": CHAT}, {"messages": OTHER}])
    ids = tokenizer_of("llama3").apply_chat_template(OTHER, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    cases: dict[str, tuple[dict[str, Any], list[float]]] = {
        "texts": ({"input": texts}, want),
        "ids": ({"input": ids}, want[1:]),
        "batch_of_ids": ({"input": [ids, ids]}, [want[1], want[1]]),
        "messages": ({"messages": CHAT}, want[:1]),
        # The template's BOS is the text's own: no special tokens to add, one BOS either way.
        "bos_in_text": ({"input": template(CHAT), "add_special_tokens": False}, want[:1]),
    }
    for name, (extra, expected) in cases.items():
        body = {"model": str(llama_rm), "use_activation": False, **extra}
        response = post(live, "/classify", aiohttp_body(body))
        assert response.status_code == 200, (name, response.text)
        got = [d["probs"][0] for d in response.json()["data"]]
        assert got == pytest.approx(expected, abs=1e-5), name
    cut = post(live, "/classify", aiohttp_body({"input": texts[0], "truncate_prompt_tokens": 5}))
    assert cut.json()["usage"]["prompt_tokens"] == 5
    last5 = {"input": ids[-5:], "use_activation": False}
    tail = post(live, "/classify", aiohttp_body({**last5}))
    cut_ids = post(
        live,
        "/classify",
        aiohttp_body({"input": ids, "truncate_prompt_tokens": 5, "use_activation": False}),
    )
    assert cut_ids.json()["data"][0]["probs"] == pytest.approx(tail.json()["data"][0]["probs"])


def test_pooling_and_sglang_embeddings(live: Live, llama_rm: Path) -> None:
    text = verl_input(CHAT)
    raw = v1_score(live, [{"messages": CHAT}])[0]
    pooled = post(
        live,
        "/pooling",
        aiohttp_body({"model": str(llama_rm), "input": text, "task": "classify"}),
    )
    assert pooled.status_code == 200, pooled.text
    body = PoolingResponse.model_validate(pooled.json())
    assert body.id.startswith("pooling-") and body.data[0].object == "pooling"
    assert body.data[0].data[0] == pytest.approx(sigmoid(raw), abs=1e-6)
    # verl's SGLang path: {"model", "input"} to /v1/embeddings, data[-1].embedding[-1].
    response = post(live, "/v1/embeddings", aiohttp_body({"model": str(llama_rm), "input": text}))
    assert response.status_code == 200, response.text
    assert response.json()["data"][-1]["embedding"][-1] == pytest.approx(raw, abs=1e-5)
    assert response.json()["data"][-1]["object"] == "embedding"


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        ("/classify", {"model": "nope", "input": "x"}, 404, "The model `nope` does not exist."),
        ("/classify", {"input": []}, 400, "You must pass at least one prompt"),
        ("/classify", {"input": 5}, 400, "input"),  # a validation error: "Bad Request"
        ("/classify", {"input": "x", "truncate_prompt_tokens": 10**6}, 400, "max_model_len"),
        ("/classify", {"input": [10**7]}, 400, "outside the vocabulary"),
        ("/pooling", {"input": "x", "task": "embed"}, 400, "'classify' task only"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "does not exist"),
    ],
)
def test_vllm_errors_in_vllms_envelope(
    live: Live, path: str, payload: dict[str, Any], status: int, message: str
) -> None:
    response = post(live, path, aiohttp_body(payload))
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and message in error["message"]
    kinds = {404: "NotFoundError", 400: "BadRequestError"}
    want = "Bad Request" if payload.get("input") == 5 else kinds[status]
    assert error["type"] == want


def test_classify_truncation_ids_and_vllm_details(live: Live, llama_rm: Path) -> None:
    tokenizer = tokenizer_of("llama3")
    text = verl_input(CHAT)
    ids = tokenizer(text)["input_ids"]  # the BOS the tokenizer adds, then the text's tokens
    cut = {"input": text, "truncate_prompt_tokens": 5, "use_activation": False}
    got = post(live, "/classify", aiohttp_body(cut)).json()
    # Cut from the left (the server's side), the BOS kept: BOS + the last 4 text tokens.
    kept = {"input": ids[:1] + ids[-4:], "use_activation": False}
    want = post(live, "/classify", aiohttp_body(kept)).json()
    assert got["usage"]["prompt_tokens"] == 5
    assert got["data"][0]["probs"] == pytest.approx(want["data"][0]["probs"], abs=1e-6)
    with live.client() as client:
        named = client.post(
            "/classify",
            json={"model": f"{llama_rm}/", "input": "x", "request_id": "abc"},
            headers={"X-Request-Id": "hdr1"},
        )
        by_body = client.post("/classify", json={"input": "x", "request_id": "abc"})
    assert named.status_code == 200  # the same path, written with a trailing slash
    assert named.json()["id"] == "classify-hdr1" and by_body.json()["id"] == "classify-abc"
    assert set(by_body.json()["usage"]) == {
        "prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
        "completion_tokens_details",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "message", "kind", "param"),
    [
        ({"input": "x", "truncate_prompt_tokens": 0}, "-1 or at least 1", "Bad Request", None),
        ({"input": "x", "normalize": True}, "`normalize` was removed", "Bad Request", None),
        ({"input": 5}, "input", "Bad Request", "body.input"),
        ({"input": "x", "encoding_format": "base64"}, "float", "Bad Request", None),
    ],
)
def test_vllm_validation_errors(
    live: Live, payload: dict[str, Any], message: str, kind: str, param: str | None
) -> None:
    response = post(live, "/pooling", aiohttp_body(payload))
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == kind
    if param is not None:
        assert error["param"] == param


def test_tool_calls_without_content_and_reasoning_turns(live: Live, llama_rm: Path) -> None:
    chat: list[dict[str, Any]] = [
        {"role": "user", "content": "weather today"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "weather", "arguments": {"day": "today"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c0"},
        {"role": "assistant", "content": "sunny today", "reasoning_content": "the tool said so"},
    ]
    reward = v1_score(live, [{"messages": chat}])[0]
    ids = tokenizer_of("llama3").apply_chat_template(chat, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    model = AutoModelForSequenceClassification.from_pretrained(llama_rm).eval()
    with torch.inference_mode():
        assert reward == pytest.approx(
            float(model(input_ids=torch.tensor([ids])).logits[0, 0]), abs=1e-5
        )
    with live.client() as client:
        bad = client.post(
            "/v1/score", json={"items": [{"messages": [{"role": "user", "content": None}]}]}
        )
    assert bad.status_code == 422 and "null only beside tool_calls" in bad.text


def test_openrlhf_get_reward_replay(live: Live) -> None:
    # OpenRLHF's query: the actor's decode of prompt + response, special tokens kept: the
    # template's BOS and the closing EOS are in the text.
    query = template(CHAT)
    prompt = template(CHAT[:1])
    payload = {"query": [query], "prompts": [prompt], "labels": [""]}
    response = post(live, "/get_reward", aiohttp_body(payload))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    info = response.json()
    # agent.py: scores = info.get("scores") or rewards; extra_logs = info.get("extra_logs") or {}
    rewards, scores = info.get("rewards"), info.get("scores")
    if scores is None:
        scores = rewards
    extra_logs = info.get("extra_logs") or {}
    assert torch.tensor([rewards]).shape == (1, 1) and torch.tensor([scores]).shape == (1, 1)
    for value in extra_logs.values():
        torch.tensor([value])  # numbers only: OpenRLHF logs each as a tensor
    assert rewards[0] == pytest.approx(v1_score(live, [{"messages": CHAT}])[0], abs=1e-5)
    assert extra_logs["n_tokens"] == [float(len(tokenizer_of("llama3")(query)["input_ids"]) - 1)]


def test_tei_predict(live: Live) -> None:
    prompt, answer = CHAT[0]["content"], CHAT[1]["content"]
    text = template(CHAT)
    want_text, want_pair = v1_score(live, [{"text": text}, {"prompt": prompt, "response": answer}])
    single = post(live, "/predict", json.dumps({"inputs": text}).encode()).json()
    assert single == [{"score": pytest.approx(sigmoid(want_text), abs=1e-6), "label": "LABEL_0"}]
    raw = post(live, "/predict", json.dumps({"inputs": text, "raw_scores": True}).encode())
    assert raw.json()[0]["score"] == pytest.approx(want_text, abs=1e-5)
    pair = post(live, "/predict", json.dumps({"inputs": [prompt, answer], "raw_scores": True}))
    assert pair.json()[0]["score"] == pytest.approx(want_pair, abs=1e-5)
    batch = {"inputs": [[text], [prompt, answer]], "raw_scores": True}
    got = post(live, "/predict", json.dumps(batch).encode()).json()
    assert [[p["score"] for p in row] for row in got] == [
        [pytest.approx(want_text, abs=1e-5)],
        [pytest.approx(want_pair, abs=1e-5)],
    ]


def test_tei_truncation_direction(live: Live) -> None:
    long = " ".join(["the sky is blue", "the cat sat on a mat"] * 120)
    with live.client() as client:
        want = {
            side: client.post(
                "/v1/score", json={"items": [{"text": long}], "truncation_side": side}
            ).json()["results"][0]
            for side in ("left", "right")
        }
    assert want["left"]["truncated"] and want["left"]["reward"] != want["right"]["reward"]
    for direction, side in (("Left", "left"), ("right", "right")):
        body = {"inputs": long, "raw_scores": True, "truncation_direction": direction}
        got = post(live, "/predict", json.dumps(body).encode()).json()[0]["score"]
        assert got == pytest.approx(want[side]["reward"], abs=1e-5), direction
    default = post(live, "/predict", json.dumps({"inputs": long, "raw_scores": True}).encode())
    assert default.json()[0]["score"] == pytest.approx(want["right"]["reward"], abs=1e-5)


@pytest.mark.parametrize(
    ("payload", "status", "error_type"),
    [
        ({"inputs": []}, 400, "Empty"),
        ({"inputs": ["a", "b", "c"]}, 422, "Validation"),
        ({"inputs": " ".join(["sky"] * 600), "truncate": False}, 422, "Validation"),
    ],
)
def test_tei_errors_in_teis_envelope(
    live: Live, payload: dict[str, Any], status: int, error_type: str
) -> None:
    response = post(live, "/predict", json.dumps(payload).encode())
    assert response.status_code == status
    assert set(response.json()) == {"error", "error_type"}
    assert response.json()["error_type"] == error_type


def test_cohere_jina_rerank_shape(live: Live) -> None:
    prompt = "why is the sky blue"
    docs = ["rayleigh scattering explains the sky", "the cat sat on a mat", "sunny today"]
    want = v1_score(live, [{"prompt": prompt, "response": d} for d in docs])
    order = sorted(range(3), key=lambda i: -want[i])
    # Cohere's SDK sends its own fields (accepted, not used) and no return_documents.
    cohere_body = {
        "model": "rerank-v3.5",
        "query": prompt,
        "documents": docs,
        "top_n": 3,
        "max_tokens_per_doc": 4096,
        "priority": 0,
    }
    cohere = post(live, "/v1/rerank", json.dumps(cohere_body).encode())
    jina_body = {
        "model": "jina-reranker-v2-base-multilingual",
        "query": prompt,
        "documents": [{"text": d} for d in docs],
        "top_n": 2,
        "return_documents": False,
    }
    jina = post(live, "/v1/rerank", json.dumps(jina_body).encode())
    ours = post(live, "/v1/rerank", json.dumps({"prompt": prompt, "candidates": docs}).encode())
    raw = post(
        live,
        "/v1/rerank",
        json.dumps({"query": prompt, "documents": docs, "use_activation": False}).encode(),
    )
    assert cohere.status_code == 200, cohere.text
    results = cohere.json()["results"]
    assert [r["index"] for r in results] == order
    assert [r["relevance_score"] for r in results] == pytest.approx(
        [sigmoid(want[i]) for i in order], abs=1e-6
    )
    # Documents are echoed unless the request says not to (as Jina and vLLM do).
    assert [r["document"]["text"] for r in results] == [docs[i] for i in order]
    top = RerankResponse.model_validate(jina.json()).results
    assert [r.index for r in top] == order[:2] and all(r.document is None for r in top)
    # The same rewards (to batch-shape rounding: how a request's items are split over the
    # model threads depends on timing).
    assert [r["reward"] for r in ours.json()["results"]] == pytest.approx(
        [r["reward"] for r in results], abs=1e-5
    )
    assert all(r["document"] is None for r in ours.json()["results"])
    relevance = [r["relevance_score"] for r in raw.json()["results"]]
    assert relevance == pytest.approx([want[i] for i in order], abs=1e-5)
    assert cohere.json()["usage"]["total_tokens"] == cohere.json()["usage"]["tokens"]


def test_score_is_v1_score(live: Live) -> None:
    items = [{"messages": CHAT}, {"text": "the cat sat"}]
    with live.client() as client:
        score = client.post("/score", json={"items": items})
    assert score.status_code == 200
    assert [r["reward"] for r in score.json()["results"]] == v1_score(live, items)


def test_served_model_names_keys_and_body_limit(llama_rm: Path) -> None:
    settings = Settings.model_validate(
        {
            "model": llama_rm,
            "served_model_name": ["rm-a", "rm-b"],
            "api_keys": ["k"],
            "max_body_bytes": 2048,
        }
    )
    auth = {"Authorization": "Bearer k"}
    with live_server(settings) as running, running.client() as client:
        second = client.post("/classify", json={"model": "rm-b", "input": "x"}, headers=auth)
        path = client.post("/classify", json={"model": str(llama_rm), "input": "x"}, headers=auth)
        keyless = client.post("/classify", json={"input": "x"})
        big = client.post("/classify", json={"input": "x" * 4096}, headers=auth)
        tei_big = client.post("/predict", json={"inputs": "x" * 4096}, headers=auth)
    assert second.status_code == 200 and second.json()["model"] == "rm-a"
    assert path.status_code == 404
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == 401
    assert big.status_code == 413 and big.json()["error"]["type"] == "PayloadTooLarge"
    assert tei_big.status_code == 413 and tei_big.json()["error_type"] == "Validation"


def test_openapi_documents_every_status_and_docs_work_offline(live: Live) -> None:
    with live.client() as client:
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs")
        asset = client.get("/static-offline-docs/swagger-ui-bundle.js")
    envelopes = {
        "/v1/score": "WarmError",
        "/score": "WarmError",
        "/v1/rerank": "WarmError",
        "/get_reward": "WarmError",
        "/classify": "VLLMError",
        "/pooling": "VLLMError",
        "/v1/embeddings": "VLLMError",
        "/predict": "TEIError",
    }
    for path, envelope in envelopes.items():
        responses = schema["paths"][path]["post"]["responses"]
        for status in ("400", "401", "413", "429", "503", "504"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith(f"/{envelope}"), (path, status)
        if envelope == "VLLMError":
            assert "422" not in responses, path  # vLLM answers bad bodies with a 400
        else:
            assert "422" in responses, path
        assert "500" in responses, path
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [CONTENT_TYPE_LATEST]
    assert docs.status_code == 200 and "/static-offline-docs/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    assert asset.status_code == 200 and len(asset.content) > 100_000


def test_served_model_name_is_a_repeatable_flag() -> None:
    from service.cli import parse

    names = ["--served-model-name", "/models/rm", "--served-model-name", "rm"]
    assert parse(["--model", "x", *names]).served_model_name == ["/models/rm", "rm"]
