"""The wire protocol is defined once (``online_dpo_protocol``) and both sides keep to it: the server's OpenAPI
is what the protocol's models say, route by route, for the routes of the transports it takes, with the limits
of its own configuration and model on top; the trainer's client and the colocated engine take the arguments
of ``GenerateRequest``; and the protocol and the client import none of the server's dependencies. No server
is started: the OpenAPI comes from the app before its engine starts, or with a stand-in for a ready engine."""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jsonschema import Draft202012Validator
from pydantic.json_schema import models_json_schema

from generator_server.app import create_app
from generator_server.config import ServerSettings
from online_dpo_protocol import digests
from online_dpo_protocol.models import OTHER_ANSWERS, ROUTES, GenerateRequest
from trainer_client.client import GenerateApi, GeneratorClient
from trainer_client.colocate import ColocatedEngine

ROOT = Path(__file__).resolve().parent.parent
FASTAPI_SCHEMAS = {"HTTPValidationError", "ValidationError"}
"""Components FastAPI adds itself (its 422 answer)."""


def ready_engine(**facts) -> SimpleNamespace:
    """A stand-in for a ready engine, with what the server's OpenAPI reads of one: a CUDA GPU of its own
    (so ``ipc``), a 512-token vocabulary, a 64-token context, a tokenizer that gives ``""`` no token."""
    engine = dict(
        ready=True, transports=["http", "ipc"], vocab_size=512, max_model_len=64, host_id="host-1",
        gpu_uuid="GPU-1", tokenizer=lambda text: {"input_ids": [ord(c) for c in text]},
    )  # fmt: skip
    return SimpleNamespace(**{**engine, **facts})


def served_openapi(engine: SimpleNamespace | None = None, **settings) -> dict:
    app = create_app(ServerSettings(model="unused", **settings))
    app.state.engine = engine
    return app.openapi()


CONFIGURATIONS = {
    "plain": ({"stream_port": None}, None, {"http"}),
    "stream port, checkpoint root": (
        {"stream_port": 0, "checkpoint_root": "/tmp"},
        None,
        {"http", "shared", "stream"},
    ),
    "engine on a GPU": ({"stream_port": None}, ready_engine(), {"http", "ipc"}),
}
"""Settings, engine, and the transports whose routes the server documents."""


@pytest.fixture(scope="module", params=list(CONFIGURATIONS))
def configuration(request) -> tuple[dict, set[str]]:
    """The server's OpenAPI in a configuration, and the transports it takes there."""
    settings, engine, transports = CONFIGURATIONS[request.param]
    return served_openapi(engine, **settings), transports


@pytest.fixture(scope="module")
def openapi(configuration) -> dict:
    return configuration[0]


def documented(transports: set[str]) -> dict:
    """The routes of ``ROUTES`` a server taking ``transports`` documents."""
    return {k: r for k, r in ROUTES.items() if r.transport is None or r.transport in transports}


def without_null_defaults(schema):
    """``"default": null`` says nothing a JSON Schema validator uses; FastAPI leaves it out."""
    if isinstance(schema, dict):
        return {k: without_null_defaults(v) for k, v in schema.items() if not (k == "default" and v is None)}
    if isinstance(schema, list):
        return [without_null_defaults(v) for v in schema]
    return schema


def protocol_schemas(routes: dict) -> dict[str, dict]:
    """The JSON Schema of every model of ``routes`` and of the models they hold, as the OpenAPI names them:
    request bodies as they are validated, answers as they are serialized."""
    models = []
    for route in routes.values():
        models += [(route.body, "validation")] if route.body else []
        models += [(route.answer, "serialization")] if route.answer else []
    models += [(answer, "serialization") for answer in OTHER_ANSWERS.values()]
    _, top = models_json_schema(list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}")
    return without_null_defaults(top["$defs"])


def ref_name(content: dict) -> str | None:
    """The component a JSON body refers to (an optional body is ``anyOf: [ref, null]``, one with this
    server's limits ``allOf: [ref, limits]``); None for none."""
    schema = content.get("application/json", {}).get("schema", {})
    refs = [schema] + schema.get("anyOf", []) + schema.get("allOf", [])
    names = [s["$ref"].rsplit("/", 1)[1] for s in refs if "$ref" in s]
    return names[0] if names else None


def test_every_schema_of_the_openapi_is_the_protocols(configuration):
    openapi, transports = configuration
    ours = protocol_schemas(documented(transports))
    served = without_null_defaults(openapi["components"]["schemas"])
    assert set(served) - FASTAPI_SCHEMAS == set(ours), "a route's model is not in online_dpo_protocol.models"
    for name, schema in ours.items():
        assert served[name] == schema, f"the server's {name} differs from online_dpo_protocol's"


def test_every_route_takes_and_answers_what_the_protocol_says(configuration):
    """Every route of the protocol that the server takes in its configuration, and no other."""
    openapi, transports = configuration
    operations = {
        f"{method.upper()} {path}": operation
        for path, item in openapi["paths"].items()
        if not path.startswith("/v1")  # vLLM's OpenAI-compatible API, with vLLM's own models
        for method, operation in item.items()
    }
    assert set(operations) == set(documented(transports)), (
        "a route missing from ROUTES, or the wrong transport"
    )
    for key, route in documented(transports).items():
        operation = operations[key]
        body = ref_name(operation.get("requestBody", {}).get("content", {}))
        answer = ref_name(operation["responses"]["200"].get("content", {}))
        assert body == (route.body.__name__ if route.body else None), key
        assert answer == (route.answer.__name__ if route.answer else None), key


def test_digest_headers_are_the_protocols(openapi):
    """``PUT /weights`` documents exactly the protocol's digest headers, each with the protocol's form."""
    parameters = openapi["paths"]["/weights"]["put"]["parameters"]
    headers = {p["name"]: p["schema"] for p in parameters if p["in"] == "header"}
    forms = {
        digests.SHA256_HEADER: digests.HEX_DIGEST_PATTERN,
        digests.BLAKE3_HEADER: digests.HEX_DIGEST_PATTERN,
        digests.CHUNKED_SHA256_HEADER: digests.CHUNKED_SHA256_PATTERN,
    }
    assert (
        set(headers)
        == {name.lower() for name in digests.DIGEST_HEADERS.values()}
        == set(map(str.lower, forms))
    )
    for name, pattern in forms.items():
        assert headers[name.lower()]["pattern"] == pattern, name


def test_a_chunked_digest_the_client_computes_has_the_documented_form():
    """The pattern the OpenAPI states accepts what the trainer sends, and the server's parser accepts the
    same; a chunk size outside the protocol's bounds is refused on both sides."""
    value = digests.chunked_sha256(b"x" * 100, digests.MIN_DIGEST_CHUNK_BYTES)
    assert re.fullmatch(digests.CHUNKED_SHA256_PATTERN, value)
    assert digests.parse_chunked_sha256(value) == (digests.MIN_DIGEST_CHUNK_BYTES, value.split(":")[1])
    with pytest.raises(ValueError, match="power of two"):
        digests.parse_chunked_sha256(f"{3 << 20}:{'0' * 64}")
    with pytest.raises(ValueError, match="power of two"):
        digests.ChunkedSha256(None, 3 << 20)


@pytest.mark.parametrize("chunk_bytes", [1 << 19, 1 << 20, 3 << 20, 1 << 24, (1 << 24) + 1, 1 << 30, 1 << 31])
def test_the_chunked_digest_pattern_takes_the_chunk_sizes_the_server_takes(chunk_bytes):
    value = f"{chunk_bytes}:{'aB' * 32}"
    try:
        digests.parse_chunked_sha256(value)
        taken = True
    except ValueError:
        taken = False
    assert bool(re.fullmatch(digests.CHUNKED_SHA256_PATTERN, value)) == taken


# --- the limits of one server, in its schema ---------------------------------------------------------------
def body_schema(openapi: dict, route: str) -> Draft202012Validator:
    """A validator of the JSON body of ``route`` (``"POST /generate"``) as ``openapi`` states it."""
    method, path = route.split()
    schema = openapi["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": openapi["components"]})


def test_generate_states_the_prompt_and_completion_limits_exactly():
    """A body with n completions of c prompts is schema-valid exactly when the server takes that many:
    c <= --max-prompts and n x c <= --max-completions (413 otherwise), both prompt forms."""
    schema = body_schema(served_openapi(ready_engine(), max_prompts=8, max_completions=16), "POST /generate")
    for c in range(1, 12):
        for n in range(1, 20):
            taken = c <= 8 and n * c <= 16
            assert schema.is_valid({"prompts": ["a"] * c, "n": n}) == taken, (c, n)
            assert schema.is_valid({"prompt_token_ids": [[1]] * c, "n": n}) == taken, (c, n)
        assert schema.is_valid({"prompts": ["a"] * c}) == (c <= 8)  # (n: 1)


def test_the_default_completion_limit_is_left_to_the_description_and_413():
    """With the default limits (4096 prompts, 65536 completions) the exact n x prompts rule would take
    about 430 anyOf branches: the schema keeps each count's own bound and says the product in words."""
    openapi = served_openapi(ready_engine())
    schema = body_schema(openapi, "POST /generate")
    assert schema.is_valid({"prompt_token_ids": [[1]] * 4096, "n": 16})  # the server's 413, not the schema's
    assert not schema.is_valid({"prompt_token_ids": [[1]] * 4097})
    assert not schema.is_valid({"prompt_token_ids": [[1]], "n": 1025})
    assert "--max-completions 65536 (n x prompts)" in json.dumps(openapi)
    assert len(json.dumps(openapi)) < 40_000, len(json.dumps(openapi))


def test_generate_states_the_models_context_vocabulary_and_empty_prompts():
    """What the server answers 400 for, from its model: a prompt of the whole context or more (no room to
    generate), a token id outside the vocabulary, an empty prompt; and the protocol's greedy rule."""
    schema = body_schema(served_openapi(ready_engine()), "POST /generate")
    assert schema.is_valid({"prompt_token_ids": [[0, 511] + [1] * 61]})
    assert not schema.is_valid({"prompt_token_ids": [[1] * 64]})  # the context is 64
    assert not schema.is_valid({"prompt_token_ids": [[512]]})
    assert not schema.is_valid({"prompt_token_ids": [[-1]]})
    assert not schema.is_valid({"prompt_token_ids": [[]]})
    assert not schema.is_valid({"prompts": [""]})  # this tokenizer gives it no token
    assert schema.is_valid({"prompts": [" "]})
    with_bos = ready_engine(tokenizer=lambda text: {"input_ids": [1] + [ord(c) for c in text]})
    assert body_schema(served_openapi(with_bos), "POST /generate").is_valid({"prompts": [""]})
    assert schema.is_valid({"prompts": ["a"], "temperature": 0})
    assert not schema.is_valid({"prompts": ["a"], "temperature": 0, "n": 2})  # GenerateRequest's 422


def test_the_schema_follows_the_engine():
    """Before the engine is ready the schema says what the settings say (no vocabulary yet), and once it is
    ready, what the engine says; a new engine (after one died) gets its own."""
    app = create_app(ServerSettings(model="unused", stream_port=None))
    assert body_schema(app.openapi(), "POST /generate").is_valid({"prompt_token_ids": [[100000]]})
    app.state.engine = ready_engine()
    assert not body_schema(app.openapi(), "POST /generate").is_valid({"prompt_token_ids": [[100000]]})
    assert app.openapi() is app.openapi()  # built once per engine
    app.state.engine = ready_engine(vocab_size=200000)
    assert body_schema(app.openapi(), "POST /generate").is_valid({"prompt_token_ids": [[100000]]})


def test_weight_routes_state_adapters_sizes_and_the_gpu():
    """No adapter pushes without --enable-lora (400), a stream upload up to --max-upload-bytes (413), a CUDA
    IPC sender on the engine's host and GPU (400 otherwise)."""
    openapi = served_openapi(
        ready_engine(transports=["http", "shared", "ipc", "stream"]), max_upload_bytes=1000
    )
    adapter = next(p for p in openapi["paths"]["/weights"]["put"]["parameters"] if p["name"] == "adapter")
    assert adapter["schema"]["const"] is False
    assert not body_schema(openapi, "POST /weights/load").is_valid(
        {"path": "a", "version": 1, "adapter": True}
    )
    begin = body_schema(openapi, "POST /weights/stream/begin")
    assert begin.is_valid({"version": 1, "bytes": 1000}) and not begin.is_valid({"version": 1, "bytes": 1001})
    assert not begin.is_valid({"version": 1, "bytes": 8, "blake3": "0" * 63})
    tensors = [{"name": "w", "shape": [1], "dtype": "float32"}]
    ipc = body_schema(openapi, "POST /weights/ipc/begin")
    assert ipc.is_valid({"version": 1, "host_id": "host-1", "gpu_uuid": "GPU-1", "tensors": tensors})
    assert not ipc.is_valid({"version": 1, "host_id": "host-1", "gpu_uuid": "GPU-2", "tensors": tensors})
    with_lora = served_openapi(ready_engine(transports=["http", "shared"]), enable_lora=True)
    assert body_schema(with_lora, "POST /weights/load").is_valid({"path": "a", "version": 1, "adapter": True})


def test_parameters_are_never_null_and_integer_bounds_are_integers(openapi):
    """A header or query parameter is absent or a value (a fuzzer reading ``null`` sends the text "null"); an
    integer's bounds are integers (FastAPI's floats read ``seed < 2**63`` as ``seed < 9.223372036854776e18``,
    which a generator rounds)."""
    for item in openapi["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                assert {"type": "null"} not in parameter["schema"].get("anyOf", []), parameter["name"]
    seed = openapi["components"]["schemas"]["GenerateRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["exclusiveMaximum"] == 2**63 and isinstance(seed["exclusiveMaximum"], int)


def test_generate_takes_the_fields_of_generate_request():
    """The client's ``generate`` and the colocated engine's are one method, which takes exactly
    ``GenerateRequest``'s fields, with its defaults: a field added to the protocol must be added there."""
    assert GeneratorClient.generate is ColocatedEngine.generate is GenerateApi.generate
    parameters = dict(inspect.signature(GenerateApi.generate).parameters)
    parameters.pop("self")
    fields = GenerateRequest.model_fields
    assert list(parameters) == list(fields)
    for name, parameter in parameters.items():
        assert parameter.default == fields[name].default, name


def test_the_colocated_engine_checks_requests_as_the_server_does():
    """Its arguments go through ``GenerateRequest`` before the engine is touched (no engine is built here)."""
    engine = ColocatedEngine.__new__(ColocatedEngine)  # (generate reads nothing of it before checking)
    with pytest.raises(ValueError, match="needs temperature > 0"):
        engine.generate(prompts=["a"], n=2, temperature=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate(prompts=["a"], max_tokens=0)


@pytest.mark.parametrize("module", ["online_dpo_protocol", "trainer_client.client"])
def test_the_protocol_and_the_client_import_no_server_dependency(module):
    """A trainer on a machine without FastAPI or vLLM can import them (nor do they pull in torch)."""
    heavy = ["fastapi", "starlette", "uvicorn", "vllm", "torch", "transformers", "generator_server"]
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} imports {out.stdout.strip()}"
