"""This server's OpenAPI (``/openapi.json``): FastAPI's, as strict as the server it describes.

FastAPI writes the routes and the protocol's models (``online_dpo_protocol.models``), which hold for every
server. What one server takes also depends on how it was started and on its model, and the schema it serves
says that too, so that a request the schema calls valid is one this server takes:

- only the routes of the weight transports it takes (``GET /weights``' ``transports``): ``POST
  /weights/load`` with a ``--checkpoint-root``, ``/weights/stream/*`` with a stream port, ``/weights/ipc/*``
  with an engine on one CUDA GPU. The others still answer, with the 400 or 403 that says what to use;
- the limits of ``POST /generate``, in an ``allOf`` beside the protocol's ``GenerateRequest``: prompts up to
  ``--max-prompts``, ``n`` x prompts up to ``--max-completions`` (413 beyond), token id lists shorter than the
  context and ids inside the vocabulary, no empty text prompt where the tokenizer gives it no token (400);
- no adapter pushes without ``--enable-lora``, a stream upload's size up to ``--max-upload-bytes``, a CUDA
  IPC sender's host and GPU those of the engine;
- and, for every route: integer bounds as integers (FastAPI's models write them as floats, so ``2**63 - 1``
  read as ``2**63``), and a header or query parameter as absent or a value, never ``null``.

The model's limits (vocabulary, context, GPU) are known once the engine is up. Before, the schema states what
the settings say and is built again on each request; after, it is built once per engine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from generator_server.config import ServerSettings
from online_dpo_protocol.models import ROUTES

MAX_N = 1024
"""``GenerateRequest.n``'s own bound (the protocol's)."""
MAX_BUDGET_BRANCHES = 16
"""Most ``anyOf`` branches that state n x prompts <= --max-completions (:func:`completion_budget`). With the
default limits the exact rule takes about 430 branches (47 KB of schema, and a /docs page to match); past
this many the rule is left to the description and the server's 413."""
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@dataclass(frozen=True)
class ServerFacts:
    """What the schema of one server depends on."""

    transports: tuple[str, ...]
    max_prompts: int
    max_completions: int
    max_upload_bytes: int
    enable_lora: bool
    vocab_size: int | None = None
    """None: not known yet (the engine is starting); so are the next ones."""
    max_model_len: int | None = None
    empty_text_has_tokens: bool | None = None
    """Whether the tokenizer gives ``""`` a token (a BOS); if not, an empty text prompt is a 400."""
    host_id: str | None = None
    gpu_uuid: str | None = None

    @classmethod
    def of(cls, settings: ServerSettings, engine: Any | None) -> ServerFacts:
        """The facts of a server with ``settings`` and ``engine`` (None: not ready)."""
        limits = dict(
            max_prompts=settings.max_prompts,
            max_completions=settings.max_completions,
            max_upload_bytes=settings.max_upload_bytes,
            enable_lora=settings.enable_lora,
        )
        if engine is None:
            transports = ["http"]
            transports += ["shared"] if settings.checkpoint_root is not None else []
            transports += ["stream"] if settings.stream_port is not None else []
            return cls(tuple(transports), **limits)
        return cls(
            tuple(engine.transports),
            **limits,
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            empty_text_has_tokens=bool(engine.tokenizer("")["input_ids"]),
            host_id=engine.host_id,
            gpu_uuid=engine.gpu_uuid,
        )


def install(app: FastAPI) -> None:
    """Serve :func:`server_openapi` as ``app``'s schema (``app.openapi_schema = None`` still rebuilds it)."""
    app.openapi = lambda: server_openapi(app)  # type: ignore[method-assign]


def server_openapi(app: FastAPI) -> dict:
    engine = app.state.engine
    engine = engine if engine is not None and engine.ready else None
    if app.openapi_schema is not None and engine is not None and app.state.openapi_engine is engine:
        return app.openapi_schema
    facts = ServerFacts.of(app.state.settings, engine)
    schema = get_openapi(  # (FastAPI.openapi's call, with the routes this server offers)
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        summary=app.summary,
        description=app.description,
        terms_of_service=app.terms_of_service,
        contact=app.contact,
        license_info=app.license_info,
        routes=[r for r in app.routes if offered(r, facts.transports)],
        webhooks=app.webhooks.routes,
        tags=app.openapi_tags,
        servers=app.servers,
        separate_input_output_schemas=app.separate_input_output_schemas,
        external_docs=app.openapi_external_docs,
    )
    schema = strict(schema, facts)
    if engine is not None:
        app.openapi_schema, app.state.openapi_engine = schema, engine
    return schema


def offered(route: Any, transports: tuple[str, ...]) -> bool:
    """Whether a server taking ``transports`` documents ``route`` (a route of no transport: always)."""
    if not isinstance(route, APIRoute):
        return True
    keys = [f"{method} {route.path}" for method in route.methods]
    return all(ROUTES[k].transport in (None, *transports) for k in keys if k in ROUTES)


def strict(schema: dict, facts: ServerFacts) -> dict:
    """FastAPI's ``schema`` with this server's rules stated (a new dict)."""
    schema = copy.deepcopy(schema)
    _integer_bounds(schema)
    paths = schema.get("paths", {})
    for item in paths.values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _not_null(parameter["schema"])
    no_adapter = {"properties": {"adapter": {"const": False}}}
    if operation := paths.get("/generate", {}).get("post"):
        _narrow_body(operation, generate_limits(facts))
    if not facts.enable_lora and (operation := paths.get("/weights", {}).get("put")):
        for parameter in operation["parameters"]:
            if parameter["name"] == "adapter":
                parameter["schema"]["const"] = False
    if not facts.enable_lora and (operation := paths.get("/weights/load", {}).get("post")):
        _narrow_body(operation, no_adapter)
    if operation := paths.get("/weights/stream/begin", {}).get("post"):
        begin = {"properties": {"bytes": {"maximum": facts.max_upload_bytes}}}
        if not facts.enable_lora:
            begin["properties"].update(no_adapter["properties"])
        _narrow_body(operation, begin)
    if (operation := paths.get("/weights/ipc/begin", {}).get("post")) and facts.host_id is not None:
        same_gpu = {"host_id": {"const": facts.host_id}, "gpu_uuid": {"const": facts.gpu_uuid}}
        _narrow_body(operation, {"properties": same_gpu})
    return schema


def generate_limits(facts: ServerFacts) -> dict:
    """The rules ``POST /generate`` of this server adds to ``GenerateRequest``, as JSON Schema."""
    prompts = min(facts.max_prompts, facts.max_completions)
    text: dict = {"maxItems": prompts}
    ids: dict = {"maxItems": prompts}
    one_prompt: dict = {}
    if facts.empty_text_has_tokens is False:
        text["items"] = {"minLength": 1}
    if facts.max_model_len is not None:
        one_prompt["maxItems"] = facts.max_model_len - 1  # and at least one token generated
    if facts.vocab_size is not None:
        one_prompt["items"] = {"maximum": facts.vocab_size - 1}
    if one_prompt:
        ids["items"] = one_prompt
    said = [f"--max-prompts {facts.max_prompts}", f"--max-completions {facts.max_completions} (n x prompts)"]
    if facts.max_model_len is not None:
        said.append(f"a context of {facts.max_model_len} tokens, prompt and one generated token at least")
    if facts.vocab_size is not None:
        said.append(f"token ids below {facts.vocab_size}")
    limits = {
        "description": f"This server's limits: {'; '.join(said)}. Over a count: 413; a prompt too long or "
        "empty, a token id outside the vocabulary: 400.",
        "properties": {
            "prompts": text,
            "prompt_token_ids": ids,
            "n": {"maximum": min(MAX_N, facts.max_completions)},
        },
    }
    budget = completion_budget(facts.max_prompts, facts.max_completions)
    if 0 < len(budget) <= MAX_BUDGET_BRANCHES:
        limits["anyOf"] = budget
    return limits


def completion_budget(max_prompts: int, max_completions: int, max_n: int = MAX_N) -> list[dict]:
    """``n`` x prompts <= ``max_completions`` in JSON Schema, which has no arithmetic: one branch per largest
    prompt count ``c`` (``n`` up to ``max_completions // c``), so that a request is in a branch exactly when
    its product is within the limit; none where the bounds of ``n`` and of the prompts already keep it."""
    most_n, most_prompts = min(max_n, max_completions), min(max_prompts, max_completions)
    if most_n * most_prompts <= max_completions:
        return []
    counts = sorted({min(most_prompts, max_completions // n) for n in range(1, most_n + 1)}, reverse=True)
    return [
        {
            "properties": {
                "prompts": {"maxItems": c},
                "prompt_token_ids": {"maxItems": c},
                "n": {"maximum": min(most_n, max_completions // c)},
            }
        }
        for c in counts
    ]


def _narrow_body(operation: dict, rules: dict) -> None:
    """The JSON body of ``operation`` must also satisfy ``rules`` (the protocol's model stays referenced)."""
    content = operation["requestBody"]["content"]["application/json"]
    content["schema"] = {"allOf": [content["schema"], rules]}


def _not_null(schema: dict) -> dict:
    """An optional parameter's schema (``anyOf: [X, null]`` from ``X | None``) as ``X``: a header or a query
    parameter is absent or a string, and a fuzzer that reads ``null`` sends the text ``null``."""
    kinds = schema.get("anyOf", [])
    if {"type": "null"} not in kinds or len(kinds) != 2:
        return schema
    (kind,) = [k for k in kinds if k != {"type": "null"}]
    return {**{k: v for k, v in schema.items() if k != "anyOf"}, **kind}


def _integer_bounds(node: Any) -> None:
    """Integer bounds as integers, in place: FastAPI's OpenAPI models hold them as floats (``1024.0``, and
    ``2**63`` for ``seed``'s exclusive maximum, read back as an integer exactly)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in BOUNDS:
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integer_bounds(value)
