"""HTTP edge cases of GeneratorClient against a FAKE transport (httpx.MockTransport, no server): retries
with backoff on connection errors and 5xx only, 4xx raised at once with the server's message, streaming
pushes with their SHA-256. The client against the real server is covered by tests/test_trainer_e2e.py."""

import hashlib
import json

import httpx
import pytest

from trainer_client.client import (
    GeneratorClient,
    GeneratorHTTPError,
    GeneratorUnavailable,
    StaleVersionError,
)

GENERATE_OK = {
    "weights_version": 3,
    "results": [
        {
            "prompt_token_ids": [1, 2],
            "completions": [{"text": "hi", "token_ids": [7], "logprobs": None, "finish_reason": "stop"}],
        }
    ],
}


def fake_client(handler, **kwargs) -> GeneratorClient:
    kwargs.setdefault("backoff", 0.001)
    return GeneratorClient("http://fake", transport=httpx.MockTransport(handler), **kwargs)


def test_generate_body_auth_and_typed_response():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json=GENERATE_OK)

    out = fake_client(handler, api_key="k").generate(prompts=["a"], n=2, max_tokens=5, seed=1, logprobs=True)
    assert seen["auth"] == "Bearer k"
    assert seen["body"]["prompts"] == ["a"] and seen["body"]["n"] == 2 and seen["body"]["logprobs"] is True
    assert "prompt_token_ids" not in seen["body"]
    assert out.weights_version == 3 and out.results[0].completions[0].token_ids == [7]
    with pytest.raises(ValueError):
        fake_client(handler).generate()


def test_retries_5xx_and_connection_errors_then_succeeds():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(503, json={"detail": "engine starting"})
        return httpx.Response(
            200,
            json={"status": "ok", "model": "m", "weights_version": 0, "vllm_version": "x", "device": "cpu"},
        )

    assert fake_client(handler, max_retries=3).health().weights_version == 0
    assert len(calls) == 3


def test_gives_up_after_retries_with_clear_error():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("connection refused")

    with pytest.raises(GeneratorUnavailable, match="after 3 attempt.*refused"):
        fake_client(handler, max_retries=2).weights_spec()
    assert len(calls) == 3

    def broken(request):
        return httpx.Response(500, json={"detail": "boom"})

    with pytest.raises(GeneratorHTTPError, match="500: boom"):
        fake_client(broken, max_retries=1).metrics()


def test_4xx_is_not_retried_and_carries_the_message():
    calls = []

    def handler(request):
        calls.append(1)
        detail = [{"loc": ["body", "max_tokens"], "msg": "Input should be greater than 0", "type": "x"}]
        return httpx.Response(422, json={"detail": detail})

    with pytest.raises(GeneratorHTTPError) as e:
        fake_client(handler, max_retries=5).generate(prompts=["a"], max_tokens=0)
    assert len(calls) == 1
    assert e.value.status_code == 422 and "max_tokens: Input should be greater than 0" in str(e.value)


def test_push_file_streams_with_sha256_and_409(tmp_path):
    payload = b"x" * (3 * 1024 * 1024 + 5)  # several chunks
    path = tmp_path / "w.safetensors"
    path.write_bytes(payload)
    seen = {}

    def handler(request):
        body = b"".join(request.stream)
        seen.update(version=request.url.params["version"], sha=request.headers["x-weights-sha256"], body=body)
        seen["length"] = request.headers.get("content-length")
        if request.url.params["version"] == "1":
            return httpx.Response(409, json={"detail": "version 1 <= current 2"})
        return httpx.Response(200, json={"weights_version": 7, "bytes": len(body), "load_seconds": 0.1})

    client = fake_client(handler)
    out = client.push_weights_file(path, version=7)
    assert out.weights_version == 7 and seen["version"] == "7" and seen["body"] == payload
    assert seen["sha"] == hashlib.sha256(payload).hexdigest() and seen["length"] == str(len(payload))
    with pytest.raises(StaleVersionError, match="409: version 1 <= current 2"):
        client.push_weights_file(path, version=1)


def test_retried_push_resends_the_whole_body(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"abc" * 1000)
    bodies = []

    def handler(request):
        bodies.append(b"".join(request.stream))
        if len(bodies) == 1:
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(200, json={"weights_version": 1, "bytes": 3000, "load_seconds": 0.0})

    fake_client(handler).push_weights_file(path, version=1)
    assert bodies == [b"abc" * 1000] * 2


def test_push_state_dict_is_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load

    got = {}

    def handler(request):
        got.update(load(b"".join(request.stream)))
        return httpx.Response(200, json={"weights_version": 1, "bytes": 0, "load_seconds": 0.0})

    fake_client(handler).push_weights({"w": torch.arange(6.0).view(2, 3)}, version=1, tmp_dir=tmp_path)
    assert got["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert list(tmp_path.iterdir()) == []  # temporary file removed


def test_a_restarting_server_is_waited_for_up_to_restart_timeout():
    """A server that restarts its engine answers 503 (or refuses connections) for longer than the retries
    last: with ``restart_timeout`` the request keeps trying until the server is back; without, it stops.
    A 500 is not a restart and gets only ``max_retries``."""
    calls = []
    ok = {"status": "ok", "model": "m", "weights_version": 0, "vllm_version": "x", "device": "cpu"}

    def handler(request):
        calls.append(1)
        if len(calls) <= 3:
            raise httpx.ConnectError("refused")
        if len(calls) <= 8:
            return httpx.Response(503, json={"detail": "the engine is starting"})
        return httpx.Response(200, json=ok)

    assert fake_client(handler, max_retries=1, restart_timeout=60).health().weights_version == 0
    assert len(calls) == 9
    calls.clear()
    with pytest.raises(GeneratorUnavailable, match="503"):
        fake_client(handler, max_retries=4).health()
    assert len(calls) == 5

    def broken(request):
        calls.append(1)
        return httpx.Response(500, json={"detail": "boom"})

    calls.clear()
    with pytest.raises(GeneratorHTTPError, match="500: boom"):
        fake_client(broken, max_retries=1, restart_timeout=60).metrics()
    assert len(calls) == 2


def test_giving_up_repeats_what_the_server_said_it_was_doing():
    """A server whose engine died says so in its 503s; if it then stops answering altogether, the error
    the trainer stops with still names that cause (the server's own words), not only "connection refused"."""
    calls = []
    died = "the engine died (the engine process VllmWorker-0 was killed by SIGKILL); the server is starting"

    def handler(request):
        calls.append(1)
        if len(calls) <= 2:
            return httpx.Response(503, json={"detail": died})
        raise httpx.ConnectError("refused")

    with pytest.raises(
        GeneratorUnavailable, match=r"ConnectError: refused \(the server had said: the engine died"
    ):
        fake_client(handler, max_retries=3).generate(prompts=["hi"])
    calls.clear()
    with pytest.raises(GeneratorUnavailable, match=r"503: the engine died .*SIGKILL.*\(1 attempt"):
        fake_client(handler, max_retries=0).generate(prompts=["hi"])


def test_one_server_is_waited_for_but_a_replica_is_dropped():
    """The restart wait applies to a lone server; among replicas, one that is away must be dropped after
    its retries (the others take its prompts), not waited for, or every batch would wait on it."""
    from trainer_client.backends import make_backend
    from trainer_client.config import TrainConfig

    one = make_backend(TrainConfig(model="m", server_url="http://127.0.0.1:9", server_restart_timeout=300))
    assert one.client.restart_timeout == 300
    one.close()
    two = make_backend(TrainConfig(model="m", server_url=["http://127.0.0.1:9", "http://127.0.0.1:10"]))
    assert [r.backend.client.restart_timeout for r in two.replicas] == [0.0, 0.0]
    two.close()
