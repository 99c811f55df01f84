"""Schema fuzzing (issue 15, item 1): schemathesis against the server's own OpenAPI schema.

Every endpoint the schema lists is fuzzed (positive and negative data, undeclared methods, the stateful
phase where the schema links operations) with the API key and every check schemathesis has: no 5xx, every
answer (status, content type, headers, body) as the schema says, and a request the schema calls valid
accepted, but for the few refusals ``schemathesis.toml`` lists with the reason JSON Schema cannot state them
(issue 29, item 5: the schema is the server's own, with its routes and limits). Then ``PUT /weights`` gets
bodies built from a real weights file, cut short or with bytes changed: each is refused, and the weights the
engine holds (``GET /weights/digest``) are those served before, to the byte. The server has small limits (8
prompts, 16 completions, a 64-token context) so that any request the fuzzer builds is answered in well under
a second."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from server_process import ServerHandle, running_server

API_KEY = "fuzz-key"
MAX_EXAMPLES = 20
"""Cases per operation and phase: about 500 requests, 1-2 minutes on a 2-core CPU."""
CONFIG = Path(__file__).with_name("schemathesis.toml")
TRANSFER_TIMEOUT = 3
"""The fuzzed server's --transfer-timeout: a stream upload the fuzzer begins and never sends is dropped
after this many seconds (the stream routes exist by default)."""


@pytest.fixture(scope="module")
def fuzz_work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-work")


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, fuzz_work_dir, tmp_path_factory) -> Iterator[ServerHandle]:
    with running_server(
        tiny_model_dir,
        "--api-key", API_KEY,
        "--max-model-len", "64",
        "--max-prompts", "8",
        "--max-completions", "16",
        "--max-upload-bytes", str(4 * 2**20),
        "--work-dir", str(fuzz_work_dir),
        "--checkpoint-root", str(tmp_path_factory.mktemp("fuzz-checkpoints")),
        "--transfer-timeout", str(TRANSFER_TIMEOUT),
    ) as handle:  # fmt: skip
        # A new server's first /generate pays a one-time warm-up (3 x 63 tokens with top-k, top-p and
        # logprobs: 2.8 s on the loaded 2-core CPU, 0.5 s for the same request after it), which
        # schemathesis's 10 s response time check would count against whichever fuzzed request comes first;
        # the warm-up request takes the sampler's top-k, top-p and logprobs paths
        warm_up = {"prompts": ["a"], "n": 2, "max_tokens": 4, "top_k": 5, "top_p": 0.5, "logprobs": True}
        with handle.client() as client:
            assert client.post("/generate", json=warm_up).status_code == 200
        yield handle


def served_weights(server: ServerHandle) -> dict:
    """``GET /weights/digest``: the version served and the SHA-256 of every weight the engine holds."""
    with server.client() as client:
        response = client.get("/weights/digest")
    assert response.status_code == 200, response.text
    return response.json()


def staging_left(server_work_dir: Path) -> list[str]:
    return [p.name for p in server_work_dir.iterdir() if p.name.startswith("staging-")]


def staging_left_after_abandoned_uploads(server_work_dir: Path) -> list[str]:
    """The staging folders still there once every upload the fuzzer began and left has timed out: a stream
    upload (the stream port is on by default) whose bytes never come is dropped ``--transfer-timeout`` after
    its begin, with its folder. Polled with a generous deadline, not timed."""
    deadline = time.monotonic() + TRANSFER_TIMEOUT + 60
    while (left := staging_left(server_work_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def run_schemathesis(server: ServerHandle, report: Path, *selection: str) -> subprocess.CompletedProcess:
    """``st run`` on the server's schema, the operations ``selection`` picks, every check; its output."""
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.fail("schemathesis is not installed: pip install schemathesis")
    command = [
        str(st), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json", *selection,
        "--checks", "all",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "15",
        "--workers", "1",
        "--request-timeout", "60",
        "--generation-database", "none",
        "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    # run in the report's folder: schemathesis keeps a cache (.schemathesis/) where it runs
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=report.parent)
    print(result.stdout[-1500:])  # the summary: operations, phases, cases (docs/RELIABILITY.md)
    return result


def every_operation_tested(output: str) -> bool:
    """The summary's ``Selected: N/M`` and ``Tested: N`` agree (no operation was skipped or errored)."""
    lines = [line.strip() for line in output.splitlines()]
    selected = next((x.split()[1].split("/")[0] for x in lines if x.startswith("Selected:")), None)
    tested = next((x.split()[1] for x in lines if x.startswith("Tested:")), None)
    return selected is not None and selected == tested


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_schema(fuzzed, fuzz_work_dir, tmp_path):
    """The server's own endpoints (the OpenAI-compatible /v1 ones have their test below)."""
    before = served_weights(fuzzed)
    result = run_schemathesis(fuzzed, tmp_path / "report.json", "--exclude-path-regex", "^/v1/")
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-2000:]
    assert every_operation_tested(result.stdout), result.stdout[-3000:]
    assert served_weights(fuzzed) == before  # nothing the fuzzer sent changed the served weights
    assert not staging_left_after_abandoned_uploads(fuzz_work_dir)


@pytest.mark.parametrize(
    "body, taken",
    [
        ({"prompt_token_ids": [[511] * 63] * 8, "n": 2}, True),  # every limit reached, none passed
        ({"prompts": ["a"], "n": 16}, True),
        ({"prompt_token_ids": [[1] * 64]}, False),  # the context is 64 tokens: none left to generate (400)
        ({"prompt_token_ids": [[512]]}, False),  # the vocabulary is 512 (400)
        ({"prompts": [""]}, False),  # no token: this tokenizer adds no BOS (400)
        ({"prompt_token_ids": [[1]] * 9}, False),  # --max-prompts 8 (413)
        ({"prompt_token_ids": [[1]] * 3, "n": 6}, False),  # --max-completions 16 (413)
    ],
    ids=["at-every-limit", "n-16", "context", "vocabulary", "empty", "prompts", "completions"],
)
def test_the_schema_states_the_limits_of_this_server_and_its_model(fuzzed, body, taken):
    """The server's /openapi.json calls a /generate body valid exactly when the server takes it, at the edge
    of each of its limits; and it offers no CUDA IPC route (a CPU engine takes none)."""
    with fuzzed.client() as client:
        openapi = client.get("/openapi.json").json()
        response = client.post("/generate", json={**body, "max_tokens": 1})
    assert not any(path.startswith("/weights/ipc") for path in openapi["paths"])
    schema = openapi["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    valid = Draft202012Validator({**schema, "components": openapi["components"]}).is_valid(body)
    assert (valid, response.status_code == 200) == (taken, taken), response.text
    if not taken:
        assert response.status_code in (400, 413), response.text


def test_schemathesis_on_the_openai_compatible_routes(fuzzed, tmp_path):
    with fuzzed.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    if not any(p.startswith("/v1/") for p in paths):
        pytest.skip("this server has no /v1 routes")
    result = run_schemathesis(fuzzed, tmp_path / "report.json", "--include-path-regex", "^/v1/")
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-2000:]
    assert every_operation_tested(result.stdout), result.stdout[-3000:]


@pytest.fixture(scope="module")
def weights_file(fuzzed, make_weights) -> tuple[Path, dict]:
    """A good weights file pushed once (so its digests are known), and the digest answer after the push."""
    path = make_weights(seed=1515)
    version = fuzzed.weights_version() + 1
    assert fuzzed.push(path, version).status_code == 200
    return path, served_weights(fuzzed)


def test_digest_is_that_of_the_pushed_file(weights_file):
    """``GET /weights/digest`` reads the engine's weights: they are the pushed file's tensors, to the byte
    (q/k/v and gate/up stacked on dim 0 as vLLM stacks them), every tensor of the file included."""
    import torch
    from safetensors.torch import load_file

    path, served = weights_file
    tensors = load_file(path)
    stacked = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def from_file(name: str) -> torch.Tensor:
        for key, parts in stacked.items():
            if f".{key}." in name:
                return torch.cat([tensors[name.replace(key, part)] for part in parts])
        return tensors[name]

    def sha256(tensor: torch.Tensor) -> str:
        return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()

    assert served["dtype"] == "float32" and len(served["tensors"]) == 15  # 2 layers x 6 + embed, norm, head
    assert served["tensors"] == {name: sha256(from_file(name)) for name in served["tensors"]}
    covered = {n.replace(k, p) for n in served["tensors"] for k, ps in stacked.items() for p in ps if k in n}
    assert covered | set(served["tensors"]) >= set(tensors)  # every tensor of the file is in the digest


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damaged_weights_bodies_are_refused_and_change_nothing(fuzzed, fuzz_work_dir, weights_file, data):
    """A body cut anywhere, or with any bytes changed (header or tensor data) while X-Weights-SHA256 names
    the good file, is refused with a 4xx, and the engine still holds exactly the weights it held."""
    path, served = weights_file
    good = path.read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        body = good[: data.draw(st.integers(0, len(good) - 1), label="cut at")]
        digest = hashlib.sha256(body).hexdigest()  # the digest of what is sent: only the format can tell
    else:
        body = bytearray(good)
        # distinct positions: two flips of one byte by the same value would give the good file back
        positions = st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=8, unique=True)
        flips = data.draw(positions, label="flip at")
        for position in flips:
            body[position] ^= data.draw(st.integers(1, 255), label="xor")
        body, digest = bytes(body), hashlib.sha256(good).hexdigest()
    version = served["weights_version"] + 1
    with fuzzed.client() as client:
        response = client.put(
            "/weights", params={"version": version}, content=body, headers={"X-Weights-SHA256": digest}
        )
    assert response.status_code == 400, response.text
    assert served_weights(fuzzed) == served
    assert not staging_left(fuzz_work_dir)
