"""Bounded requests and safe listening (issue 15, items 3 and 4).

One real server with small limits (4096-byte JSON bodies, 4 prompts, 8 completions) refuses what exceeds
them with 413, naming the flag, answers what is just within them, and still takes a weights push far larger
than its JSON limit. The listening rule (no API key beyond loopback without an explicit flag) is checked on
the command line, without starting a server."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from server_process import ServerHandle, running_server

from generator_server.cli import describe_listen, describe_pushes, parse_settings

MAX_REQUEST_BYTES = 4096
MAX_PROMPTS = 4
MAX_COMPLETIONS = 8
FAST = {"max_tokens": 2, "temperature": 0.0}


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory) -> Iterator[ServerHandle]:
    with running_server(
        tiny_model_dir,
        "--api-key", "limits-key",
        "--max-model-len", "256",
        "--work-dir", str(tmp_path_factory.mktemp("limits-work")),
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--max-prompts", str(MAX_PROMPTS),
        "--max-completions", str(MAX_COMPLETIONS),
    ) as handle:  # fmt: skip
        yield handle


def body_of(size: int, **request) -> bytes:
    """``request`` as JSON, padded with trailing whitespace (still valid JSON) to exactly ``size`` bytes."""
    raw = json.dumps(request).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def post(server: ServerHandle, body: bytes, chunked: bool = False):
    """POST /generate with ``body``: with a Content-Length, or chunked (no Content-Length)."""
    content = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if chunked else body
    with server.client() as client:
        return client.post("/generate", content=content, headers={"Content-Type": "application/json"})


def prompts(count: int) -> list[list[int]]:
    return [[5 + i, 6, 7] for i in range(count)]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413_and_at_the_limit_is_answered(limited, chunked):
    request = {"prompt_token_ids": prompts(2), **FAST}
    over = post(limited, body_of(MAX_REQUEST_BYTES + 1, **request), chunked)
    assert over.status_code == 413, over.text
    assert "--max-request-bytes" in over.json()["detail"] and str(MAX_REQUEST_BYTES) in over.json()["detail"]
    at_limit = post(limited, body_of(MAX_REQUEST_BYTES, **request), chunked)
    assert at_limit.status_code == 200, at_limit.text
    assert len(at_limit.json()["results"]) == 2


def test_a_large_body_is_refused_before_it_is_parsed(limited):
    """Not even JSON: the size alone decides (a 422 would mean the body was parsed)."""
    for chunked in (False, True):
        response = post(limited, b"x" * (10 * MAX_REQUEST_BYTES), chunked)
        assert response.status_code == 413, response.text


def test_too_many_prompts_is_413_and_the_limit_itself_is_answered(limited):
    with limited.client() as client:
        over = client.post("/generate", json={"prompt_token_ids": prompts(MAX_PROMPTS + 1), **FAST})
        assert over.status_code == 413, over.text
        assert "--max-prompts" in over.json()["detail"]
        over_text = client.post("/generate", json={"prompts": ["a"] * (MAX_PROMPTS + 1), **FAST})
        assert over_text.status_code == 413 and "--max-prompts" in over_text.json()["detail"]
        at_limit = client.post("/generate", json={"prompts": ["a b"] * MAX_PROMPTS, **FAST})
        assert at_limit.status_code == 200, at_limit.text
        assert len(at_limit.json()["results"]) == MAX_PROMPTS


def test_too_many_completions_is_413_and_the_limit_itself_is_answered(limited):
    with limited.client() as client:
        over = client.post(
            "/generate", json={"prompt_token_ids": prompts(3), "n": 3, **FAST, "temperature": 1.0, "seed": 0}
        )  # 9 > 8
        assert over.status_code == 413, over.text
        assert "--max-completions" in over.json()["detail"]
        sampled = {"prompt_token_ids": prompts(MAX_PROMPTS), "n": 2, "max_tokens": 2, "seed": 0}
        at_limit = client.post("/generate", json=sampled)  # n > 1: sampled, not greedy
        assert at_limit.status_code == 200, at_limit.text
        assert [len(r["completions"]) for r in at_limit.json()["results"]] == [2] * MAX_PROMPTS
        metrics = client.get("/metrics").text
    assert 'generator_generate_requests_total{outcome="rejected"}' in metrics


def test_a_weights_push_over_the_json_limit_still_goes_through(limited, make_weights):
    path = make_weights(seed=15)
    assert path.stat().st_size > 100 * MAX_REQUEST_BYTES
    version = limited.weights_version() + 1
    response = limited.push(path, version)
    assert response.status_code == 200, response.text
    assert response.json()["weights_version"] == version == limited.weights_version()
    with limited.client() as client:  # other JSON routes are not refused at this size either
        assert client.get("/weights").status_code == 200
        load = client.post("/weights/load", json={"path": "x", "version": version + 1})
        assert load.status_code == 403  # no --checkpoint-root: refused for that, not for its size


def test_openapi_documents_the_413(limited):
    with limited.client() as client:
        spec = client.get("/openapi.json").json()
    assert "413" in spec["paths"]["/generate"]["post"]["responses"]


# --- listening beyond loopback --------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    """No GENERATOR_* variables from the environment this test runs in."""
    import os

    for key in [k for k in os.environ if k.startswith("GENERATOR_")]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_remote_host_without_a_key_is_refused(clean_env, capsys, host):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--model", "m", "--host", host])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "GENERATOR_API_KEY" in err and "127.0.0.1" in err
    assert "--allow-unauthenticated-remote" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_without_a_key_is_accepted(clean_env, host):
    settings = parse_settings(["--model", "m", "--host", host])
    assert describe_listen(settings)[0] == logging.INFO


def test_remote_host_with_a_key_is_accepted(clean_env, monkeypatch):
    assert parse_settings(["--model", "m", "--host", "0.0.0.0", "--api-key", "k"]).api_key == "k"
    monkeypatch.setenv("GENERATOR_API_KEY", "from-env")  # as compose passes it
    monkeypatch.setenv("GENERATOR_HOST", "0.0.0.0")
    settings = parse_settings(["--model", "m"])
    assert settings.host == "0.0.0.0" and describe_listen(settings)[0] == logging.INFO


def test_remote_host_without_a_key_is_accepted_with_the_explicit_flag(clean_env, monkeypatch):
    settings = parse_settings(["--model", "m", "--host", "0.0.0.0", "--allow-unauthenticated-remote"])
    level, line = describe_listen(settings)
    assert level == logging.WARNING and "WITHOUT AN API KEY" in line
    monkeypatch.setenv("GENERATOR_ALLOW_UNAUTHENTICATED_REMOTE", "true")
    assert parse_settings(["--model", "m", "--host", "0.0.0.0"]).allow_unauthenticated_remote


def test_tls_needs_both_files(clean_env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--model", "m", "--ssl-certfile", "cert.pem"])
    assert exit_info.value.code == 2 and "--ssl-keyfile" in capsys.readouterr().err
    settings = parse_settings(["--model", "m", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"])
    assert describe_listen(settings)[1].startswith("listening on https://")


def test_the_stream_port_is_on_where_http_has_no_tls_and_the_server_says_so(clean_env, capsys):
    """The stream port (unencrypted) is on by default, and off by default with TLS; asked for with TLS it
    is refused. The start-up line says which way pushes come and what the faster way would take."""
    plain = parse_settings(["--model", "m"])
    assert plain.stream_port == 0 and "the stream port (a free port" in describe_pushes(plain)
    tls = ["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"]
    secured = parse_settings(["--model", "m", *tls])
    assert secured.stream_port is None
    assert describe_pushes(secured).startswith("pushes: PUT /weights only (--ssl-certfile: it has no TLS)")
    off = parse_settings(["--model", "m", "--stream-port", "off"])
    assert off.stream_port is None and "twice as fast" in describe_pushes(off)
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--model", "m", *tls, "--stream-port", "8100"])
    assert exit_info.value.code == 2 and "without TLS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--model", "m", "--stream-port", "fast"])
