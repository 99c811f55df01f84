"""The OpenAI-compatible endpoints, called with the official ``openai`` client on the shared server (the
tiny model carries a chat template): same engine as ``/generate``, same API key, and every answer names
the one weights version it came from, a stream included while a push waits for it."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from conftest import API_KEY, ON_GPU, REPEAT_LOGPROB_TOLERANCE, common_prefix
from fastapi.testclient import TestClient

from generator_server.app import create_app
from generator_server.cli import parse_settings

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
NO_TOKENS = "\ufffd"
"""vLLM's detokenizer writes an incomplete UTF-8 tail (the tiny model's random bytes) as U+FFFD."""


@pytest.fixture
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def version_of(raw) -> int:
    return int(raw.headers["X-Weights-Version"])


def test_models_lists_the_served_model(oa, tiny_model_dir):
    (model,) = oa.models.list().data
    assert model.id == str(tiny_model_dir) and model.max_model_len == 256


def test_completions_match_generate_and_honour_n_seed_stop(oa, server, client, tokenizer, tiny_model_dir):
    """Greedy tokens and log-probabilities equal ``/generate``'s (one engine, raw log-probabilities);
    ``n`` with a ``seed`` repeats exactly; a ``stop`` string cuts a seeded sample where it first appears."""
    ids = tokenizer("The cat sat")["input_ids"]
    greedy = dict(model=str(tiny_model_dir), prompt=ids, max_tokens=12, temperature=0, logprobs=0)
    raw = oa.completions.with_raw_response.create(**greedy, extra_body={"return_token_ids": True})
    answer = raw.parse()
    (choice,) = answer.choices
    assert version_of(raw) == answer.model_extra["weights_version"] == server.weights_version()
    assert choice.prompt_token_ids == ids and len(choice.token_ids) == 12
    ours = client.post(
        "/generate",
        json={"prompt_token_ids": [ids], "max_tokens": 12, "temperature": 0, "logprobs": True},
    ).json()["results"][0]["completions"][0]
    assert choice.token_ids == ours["token_ids"] and choice.text == ours["text"]
    pairs = zip(choice.logprobs.token_logprobs, ours["logprobs"], strict=True)
    assert all(abs(a - b) <= REPEAT_LOGPROB_TOLERANCE for a, b in pairs)

    sampled = dict(model=str(tiny_model_dir), prompt="Hello", max_tokens=8, n=3, seed=11, temperature=1.0)
    first, second = (oa.completions.create(**sampled, extra_body={"return_token_ids": True}) for _ in "ab")
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in second.choices]
    assert len({tuple(c.token_ids) for c in first.choices}) > 1  # n samples, not n copies

    one = {**sampled, "n": 1, "max_tokens": 16}
    text = oa.completions.create(**one).choices[0].text
    stop = next(c for c in text[len(text) // 2 :] if c not in NO_TOKENS + text[0])
    stopped = oa.completions.create(**one, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]


def test_chat_completions_streamed_and_not(oa, server, tokenizer, tiny_model_dir):
    """The chat template renders the prompt; a stream carries the same greedy text as the JSON answer."""
    request = dict(model=str(tiny_model_dir), messages=CHAT, max_tokens=10, temperature=0)
    raw = oa.chat.completions.with_raw_response.create(
        **request, logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True}
    )
    answer = raw.parse()
    (choice,) = answer.choices
    assert version_of(raw) == answer.model_extra["weights_version"] == server.weights_version()
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("user: Count to three.\nassistant:")
    assert answer.model_extra["prompt_token_ids"] == tokenizer(prompt)["input_ids"]
    assert choice.message.role == "assistant" and len(choice.token_ids) == 10
    steps = choice.logprobs.content
    assert len(steps) == 10 and all(len(step.top_logprobs) == 2 for step in steps)
    assert answer.usage.completion_tokens == 10

    raw = oa.chat.completions.with_raw_response.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    assert version_of(raw) == server.weights_version()
    chunks = list(raw.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content and len(chunks) > 3
    assert chunks[-1].usage.completion_tokens == 10


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
    ],
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_401_without_the_key(server, method, path, body, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]


def test_openai_client_raises_authentication_error(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404, "no-such-model"),
        ("/v1/completions", {"prompt": ["hi"] * 100, "n": 700}, 413, "--max-completions"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 70_000}, 413, "--max-completions"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": -3}, 400, "logprobs"),
    ],
)
def test_bad_requests_get_openai_errors(client, path, body, status, message):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and message in error["message"], error


def test_version_header_changes_after_a_push_and_never_mixes_during_one(server, client, make_weights):
    """A push sent while a stream runs waits for its last token: the whole stream is the greedy answer of
    the version it started on (new weights change that answer), and the next request names the new one."""
    request = {"prompt": "Count", "max_tokens": 240, "ignore_eos": True, "temperature": 0, "logprobs": 0}
    before = client.post("/v1/completions", json=request)
    version = version_of(before)
    reference = before.json()["choices"][0]["logprobs"]["tokens"]

    pushed: dict = {}

    def push() -> None:
        pushed["sent"] = time.monotonic()
        pushed["status"] = server.push(make_weights(seed=1313), version + 1).status_code
        pushed["done"] = time.monotonic()

    pusher = threading.Thread(target=push)
    tokens = []
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as stream:
        assert stream.status_code == 200 and version_of(stream) == version
        for line in stream.iter_lines():
            if not line.startswith("data: {"):
                continue
            tokens += json.loads(line.removeprefix("data: "))["choices"][0]["logprobs"]["tokens"]
            if pusher.ident is None:
                pusher.start()  # after the first token: the stream holds the weights
        ended = time.monotonic()
    pusher.join()
    assert pushed["status"] == 200
    assert pushed["sent"] < ended < pushed["done"], "the push did not wait for the stream"
    # On the GPU a greedy near-tie may flip (conftest.same_outputs); new weights change the first token.
    assert tokens == reference or (ON_GPU and common_prefix(tokens, reference) > 0)

    after = client.post("/v1/completions", json=request)
    assert version_of(after) == after.json()["weights_version"] == version + 1
    assert after.json()["choices"][0]["logprobs"]["tokens"] != reference


def test_before_the_engine_is_up_v1_answers_503_and_checks_the_key(tmp_path):
    client = TestClient(create_app(parse_settings(["--model", str(tmp_path), "--api-key", "k"])))  # no engine
    assert client.get("/v1/models").status_code == 401
    response = client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer k"})
    assert response.status_code == 503 and "starting" in response.json()["error"]["message"]


def test_schema_declares_the_openai_requests_and_answers(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path, answer in [
        ("/v1/completions", "CompletionAnswer"),
        ("/v1/chat/completions", "ChatCompletionAnswer"),
    ]:
        operation = paths[path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("Request")
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(answer)
        assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert "get" in paths["/v1/models"]
    assert not any("{path" in p for p in paths)  # the stand-in of the starting server is gone
