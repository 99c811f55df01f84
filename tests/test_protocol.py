"""The wire protocol is defined once (``online_dpo_protocol``) and both sides keep to it: the server's OpenAPI
is what the protocol's models say, route by route; the trainer's client and the colocated engine take the
arguments of ``GenerateRequest``; and the protocol and the client import none of the server's dependencies.
No server is started: the OpenAPI comes from the app before its engine starts."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module", params=[None, 0], ids=["plain", "stream-port"])
def openapi(request) -> dict:
    """The server's OpenAPI, without and with a stream port (the routes it documents do not depend on the
    configuration today; the test holds both to the protocol)."""
    app = create_app(ServerSettings(model="unused", stream_port=request.param))
    return app.openapi()


def without_null_defaults(schema):
    """``"default": null`` says nothing a JSON Schema validator uses; FastAPI leaves it out."""
    if isinstance(schema, dict):
        return {k: without_null_defaults(v) for k, v in schema.items() if not (k == "default" and v is None)}
    if isinstance(schema, list):
        return [without_null_defaults(v) for v in schema]
    return schema


def protocol_schemas() -> dict[str, dict]:
    """The JSON Schema of every model of ``ROUTES`` and of the models they hold, as the OpenAPI names them:
    request bodies as they are validated, answers as they are serialized."""
    models = []
    for route in ROUTES.values():
        models += [(route.body, "validation")] if route.body else []
        models += [(route.answer, "serialization")] if route.answer else []
    models += [(answer, "serialization") for answer in OTHER_ANSWERS.values()]
    _, top = models_json_schema(list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}")
    return without_null_defaults(top["$defs"])


def ref_name(content: dict) -> str | None:
    """The component a JSON body refers to (an optional body is ``anyOf: [ref, null]``); None for none."""
    schema = content.get("application/json", {}).get("schema", {})
    refs = [schema] + schema.get("anyOf", [])
    names = [s["$ref"].rsplit("/", 1)[1] for s in refs if "$ref" in s]
    return names[0] if names else None


def test_every_schema_of_the_openapi_is_the_protocols(openapi):
    ours = protocol_schemas()
    served = without_null_defaults(openapi["components"]["schemas"])
    assert set(served) - FASTAPI_SCHEMAS == set(ours), "a route's model is not in online_dpo_protocol.models"
    for name, schema in ours.items():
        assert served[name] == schema, f"the server's {name} differs from online_dpo_protocol's"


def test_every_route_takes_and_answers_what_the_protocol_says(openapi):
    operations = {
        f"{method.upper()} {path}": operation
        for path, item in openapi["paths"].items()
        if not path.startswith("/v1")  # vLLM's OpenAI-compatible API, with vLLM's own models
        for method, operation in item.items()
    }
    assert set(operations) == set(ROUTES), "add the route to online_dpo_protocol.models.ROUTES"
    for key, route in ROUTES.items():
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
