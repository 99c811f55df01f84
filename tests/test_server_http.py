"""The HTTP contract against the real server and engine: shapes of every answer, and every refusal
(401/403/404/409/413/422/400) leaves the server serving the same weights, byte for byte."""

from __future__ import annotations

import hashlib
import os
import re

import blake3
import httpx
import pytest
import torch
from conftest import MAX_UPLOAD_BYTES, PROBE, probe, same_outputs, text_matches_tokens
from safetensors import safe_open


# --- the contract -------------------------------------------------------------------------------------
def test_health_is_open_and_complete(server):
    response = httpx.get(f"{server.url}/health")  # no API key
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "status", "model", "weights_version", "vllm_version", "device", "engine_restarts", "last_engine_error"
    }  # fmt: skip
    assert body["engine_restarts"] == 0 and body["last_engine_error"] is None  # (test_engine_restart.py)
    import torch

    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert body["status"] == "ok" and body["device"] == expected_device
    assert isinstance(body["weights_version"], int) and re.match(r"\d+\.\d+", body["vllm_version"])


def test_generate_answer_shape(client, tiny_model_dir):
    from transformers import AutoTokenizer

    version = client.get("/health").json()["weights_version"]
    response = client.post("/generate", json={"prompts": ["The cat", "Hello"], "max_tokens": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"weights_version", "results", "timing"} and body["weights_version"] == version
    assert body["timing"]["generate_seconds"] > 0 and body["timing"]["weights_wait_seconds"] >= 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for prompt, result in zip(["The cat", "Hello"], body["results"], strict=True):
        assert result["prompt_token_ids"] == tokenizer(prompt)["input_ids"]
        (completion,) = result["completions"]
        assert set(completion) == {"text", "token_ids", "logprobs", "finish_reason"}
        assert 1 <= len(completion["token_ids"]) <= 5 and completion["logprobs"] is None
        assert completion["finish_reason"] in ("stop", "length")
        decoded = tokenizer.decode(completion["token_ids"], skip_special_tokens=True)
        assert text_matches_tokens(completion["text"], decoded), (completion["text"], decoded)


def test_token_id_prompts_equal_text_prompts(client):
    by_text = probe(client)
    ids = [r["prompt_token_ids"] for r in by_text["results"]]
    by_ids = client.post(
        "/generate",
        json={**PROBE, "prompts": None, "prompt_token_ids": ids, "logprobs": True, "ignore_eos": True},
    )
    assert by_ids.status_code == 200
    assert same_outputs(by_ids.json(), by_text), (by_ids.json(), by_text)


def test_weights_spec_matches_the_model_folder(client, tiny_model_dir):
    body = client.get("/weights").json()
    assert body["weights_version"] == client.get("/health").json()["weights_version"]
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        expected = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    assert {name: spec["shape"] for name, spec in body["tensors"].items()} == expected
    assert {spec["dtype"] for spec in body["tensors"].values()} == {"float32"}


def test_metrics_count_requests_tokens_and_version(client):
    before = client.get("/metrics").text
    generated = sum(
        len(c["token_ids"]) for r in probe(client)["results"] for c in r["completions"]
    )  # fmt: skip
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "generator_generate_requests_total", "generator_prompts_total", "generator_generated_tokens_total",
        "generator_generate_latency_seconds_bucket", "generator_weight_loads_total",
        "generator_weight_load_seconds_count", "generator_weights_version", "generator_weight_loads_waiting",
        "generator_generate_requests_running",
    ):  # fmt: skip
        assert name in text, name
    assert _metric(text, "generator_generated_tokens_total") - _metric(
        before, "generator_generated_tokens_total"
    ) == (generated)
    assert _metric(text, "generator_weights_version") == client.get("/health").json()["weights_version"]
    assert _metric(text, "generator_weight_loads_waiting") == 0  # no reload in flight
    assert _metric(text, "generator_generate_requests_running") == 0  # the probe has been answered


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# --- bad requests -------------------------------------------------------------------------------------
ENDPOINTS = [
    ("POST", "/generate", {"json": {"prompts": ["a"]}}),
    ("GET", "/weights", {}),
    ("PUT", "/weights?version=99", {"content": b"x"}),
    ("POST", "/weights/load", {"json": {"path": "x", "version": 99}}),
    ("GET", "/metrics", {}),
]


@pytest.mark.parametrize("method, path, kwargs", ENDPOINTS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "test-key", "Basic dGVzdC1rZXk="])
def test_401_without_the_api_key(server, method, path, kwargs, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, f"{server.url}{path}", headers=headers, **kwargs)
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompts"),
        ({"prompts": ["a"], "prompt_token_ids": [[1]]}, "prompt_token_ids"),
        ({"prompts": "a"}, "prompts"),
        ({"prompts": []}, "prompts"),
        ({"prompts": ["a"], "n": 0}, "n"),
        ({"prompts": ["a"], "max_tokens": 0}, "max_tokens"),
        ({"prompts": ["a"], "temperature": -1}, "temperature"),
        ({"prompts": ["a"], "top_p": 0}, "top_p"),
        ({"prompts": ["a"], "top_k": -2}, "top_k"),
        ({"prompts": ["a"], "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"prompts": ["a"], "stop": "x"}, "stop"),
        ({"prompts": ["a"], "seed": -3}, "seed"),
        ({"prompts": ["a"], "logprobs": "maybe"}, "logprobs"),
        ({"prompts": ["a"], "temprature": 0.5}, "temprature"),
        ({"prompts": ["a"], "n": 2, "temperature": 0}, "temperature"),
        ({"prompt_token_ids": [[1.5]]}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, 2]}, "prompt_token_ids"),
    ],
)
def test_422_names_the_field(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in str(response.json()["detail"])


def test_422_for_other_endpoints(client):
    assert (
        client.post(
            "/generate", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    response = client.put("/weights", content=b"x")
    assert response.status_code == 422 and "version" in str(response.json()["detail"])
    response = client.post("/weights/load", json={"version": 5})
    assert response.status_code == 422 and "path" in str(response.json()["detail"])


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompts": ["word " * 400]}, "context"),
        ({"prompt_token_ids": [[5] * 256]}, "256 tokens long"),
        ({"prompt_token_ids": [[1, 2], [1, 512]]}, "prompt 1 has token ids outside the vocabulary"),
        ({"prompt_token_ids": [[-1]]}, "outside the vocabulary"),
        ({"prompt_token_ids": [[1], []]}, "prompt 1 is empty"),
        ({"prompts": [""]}, "prompt 0 is empty"),
    ],
)
def test_400_for_prompts_the_model_cannot_take(client, body, message):
    response = client.post("/generate", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_longest_prompt_that_fits_still_generates(client):
    response = client.post("/generate", json={"prompt_token_ids": [[5] * 255], "max_tokens": 10})
    assert response.status_code == 200
    (completion,) = response.json()["results"][0]["completions"]
    assert len(completion["token_ids"]) == 1 and completion["finish_reason"] == "length"


# --- weight pushes that must be refused ---------------------------------------------------------------
@pytest.fixture
def served(server, client, make_weights):
    """Fresh known weights pushed as a new version; yields (version, probe answer)."""
    version = server.weights_version() + 1
    response = server.push(make_weights(seed=100 + version), version)
    assert response.status_code == 200, response.text
    return version, probe(client)


def _assert_unchanged(server, client, served, work_dir=None) -> None:
    version, answer = served
    assert server.weights_version() == version
    after = probe(client)
    assert same_outputs(after, answer), (after, answer)  # on the CPU: identical to the last bit
    if work_dir is not None:  # staging folders are gone; only the served copy stays
        assert sorted(p.name for p in work_dir.iterdir()) == [f"served-v{version}"]


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _add(tensors):
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(256, 128)


def _reshape(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(255, 128)


def _integer(tensors):
    tensors["model.norm.weight"] = torch.ones(128, dtype=torch.int64)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _drop("model.layers.0.self_attn.q_proj.weight"),
            "missing tensors: 'model.layers.0.self_attn.q_proj.weight'",
        ),
        (_add, "unknown tensors: 'model.layers.2.mlp.up_proj.weight'"),
        (_reshape, "'model.layers.1.mlp.up_proj.weight' has shape [255, 128], expected [256, 128]"),
        (_integer, "'model.norm.weight' is I64, expected F32"),
    ],
)
def test_incompatible_weights_are_refused(
    server, client, make_weights, served, server_work_dir, edit, message
):
    response = server.push(make_weights(seed=7, edit=edit), served[0] + 1)
    assert response.status_code == 400
    assert message in response.json()["detail"]
    _assert_unchanged(server, client, served, server_work_dir)


def test_truncated_body_is_refused(server, client, make_weights, served, server_work_dir, tmp_path):
    data = make_weights(seed=8).read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 1000, 5):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[:cut])
        response = server.push(path, served[0] + 1)
        assert response.status_code == 400, response.text
        assert (
            "truncated" in response.json()["detail"] or "not a safetensors file" in response.json()["detail"]
        )
    _assert_unchanged(server, client, served, server_work_dir)


@pytest.mark.parametrize("content", [b"", b"hello, not weights", os.urandom(4096)])
def test_not_safetensors_is_refused(server, client, served, server_work_dir, content):
    response = client.put("/weights", params={"version": served[0] + 1}, content=content)
    assert response.status_code == 400
    assert "not a safetensors file" in response.json()["detail"]
    _assert_unchanged(server, client, served, server_work_dir)


def test_digest_mismatch_is_refused(server, client, make_weights, served, server_work_dir):
    path = make_weights(seed=9)
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    response = server.push(path, served[0] + 1, x_weights_sha256=wrong)
    assert response.status_code == 400 and "SHA-256 mismatch" in response.json()["detail"]
    response = server.push(path, served[0] + 1, x_weights_sha256="not-hex")
    assert response.status_code == 400 and "64 hexadecimal digits" in response.json()["detail"]
    _assert_unchanged(server, client, served, server_work_dir)
    right = hashlib.sha256(path.read_bytes()).hexdigest()
    assert server.push(path, served[0] + 1, x_weights_sha256=right.upper()).status_code == 200


def test_blake3_digest_is_checked(server, client, make_weights, served, server_work_dir):
    path = make_weights(seed=14)
    wrong = blake3.blake3(b"other bytes").hexdigest()
    response = server.push(path, served[0] + 1, x_weights_blake3=wrong)
    right = blake3.blake3(path.read_bytes()).hexdigest()
    detail = response.json()["detail"]
    assert response.status_code == 400
    assert detail == f"BLAKE3 mismatch: body hashes to {right}, X-Weights-BLAKE3 says {wrong}"
    response = server.push(path, served[0] + 1, x_weights_blake3="not-hex")
    assert response.status_code == 400
    assert response.json()["detail"] == "X-Weights-BLAKE3 must be 64 hexadecimal digits"
    _assert_unchanged(server, client, served, server_work_dir)
    response = server.push(path, served[0] + 1, x_weights_blake3=right.upper())
    assert response.status_code == 200, response.text
    assert response.json()["weights_version"] == served[0] + 1
    assert not same_outputs(probe(client), served[1])  # the new weights are served


def test_409_for_a_version_not_above_the_served_one(server, client, make_weights, served, checkpoint_root):
    version = served[0]
    path = make_weights(seed=10)
    for stale in (version, version - 1, 0):
        response = server.push(path, stale)
        assert response.status_code == 409
        assert f"not greater than the served version {version}" in response.json()["detail"]
    (checkpoint_root / "stale.safetensors").write_bytes(path.read_bytes())
    response = client.post("/weights/load", json={"path": "stale.safetensors", "version": version})
    assert response.status_code == 409
    _assert_unchanged(server, client, served)


def test_413_for_a_body_over_the_limit(server, client, served):
    too_big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    response = client.put("/weights", params={"version": served[0] + 1}, content=too_big)
    assert response.status_code == 413 and "max-upload-bytes" in response.json()["detail"]

    def stream():  # no Content-Length: the limit is enforced while receiving
        for _ in range(MAX_UPLOAD_BYTES // 2**16 + 2):
            yield b"\0" * 2**16

    try:
        response = client.put("/weights", params={"version": served[0] + 1}, content=stream())
        assert response.status_code == 413
    except httpx.TransportError:
        pass  # the server may close the connection before the client has finished sending
    _assert_unchanged(server, client, served)


def test_403_and_404_for_paths_outside_or_missing(
    server, client, served, checkpoint_root, tmp_path, make_weights
):
    outside = make_weights(seed=12)
    (checkpoint_root / "escape").symlink_to(outside.parent, target_is_directory=True)
    for path in (str(outside), "../" + outside.name, f"escape/{outside.name}", "/etc/passwd"):
        response = client.post("/weights/load", json={"path": path, "version": served[0] + 1})
        assert response.status_code == 403, path
        assert "outside the checkpoint root" in response.json()["detail"]
    response = client.post("/weights/load", json={"path": "no/such.safetensors", "version": served[0] + 1})
    assert response.status_code == 404
    (checkpoint_root / "empty").mkdir()
    response = client.post("/weights/load", json={"path": "empty", "version": served[0] + 1})
    assert response.status_code == 400 and "no .safetensors file" in response.json()["detail"]
    _assert_unchanged(server, client, served)


def test_load_of_a_bad_file_is_refused(
    server, client, make_weights, served, checkpoint_root, server_work_dir
):
    bad = make_weights(seed=13, edit=_reshape)
    (checkpoint_root / "bad.safetensors").write_bytes(bad.read_bytes())
    response = client.post("/weights/load", json={"path": "bad.safetensors", "version": served[0] + 1})
    assert response.status_code == 400 and "wrong shapes" in response.json()["detail"]
    _assert_unchanged(server, client, served, server_work_dir)
