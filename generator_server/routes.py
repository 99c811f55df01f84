"""HTTP routes: a few lines each around :class:`~generator_server.engine.GenerationEngine`."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from generator_server.auth import require_api_key
from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError
from generator_server.schemas import (
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    LoadWeightsRequest,
    WeightsDigest,
    WeightsSpec,
    WeightsUpdate,
)
from generator_server.weights import no_room
from online_dpo_protocol.digests import CHUNKED_SHA256_PATTERN, HEX_DIGEST_PATTERN
from online_dpo_protocol.models import ADAPTER_FIELD, HealthNotReady

UNAUTHORIZED = {401: {"description": "missing or wrong API key (the server runs with --api-key)"}}
NOT_READY = {503: {"description": "the engine is starting, broken, or holds no whole version (reason given)"}}
router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)], responses={**UNAUTHORIZED, **NOT_READY})


def get_engine(request: Request) -> GenerationEngine:
    """The engine, once it is ready (503 before)."""
    engine: GenerationEngine | None = request.app.state.engine
    if engine is None or not engine.ready:
        raise ApiError(503, engine_unavailable(request.app))
    return engine


def engine_unavailable(app) -> str:
    """Why no engine serves now, in words: broken, dead (and what killed it), or starting."""
    engine: GenerationEngine | None = app.state.engine
    supervisor = app.state.supervisor
    if engine is not None and engine.broken:
        return engine.broken
    if supervisor.restarting or (engine is not None and engine.llm is not None and engine.llm.errored):
        cause = supervisor.last_error or "a cause still being read"
        return f"the engine died ({cause}); the server is starting a new one: retry"
    return "the engine is starting"


Engine = Annotated[GenerationEngine, Depends(get_engine)]


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"description": "no engine serves (yet, or again)", "model": HealthNotReady}},
)
async def health(request: Request):  # (async: answered on the event loop, no thread pool between)
    engine: GenerationEngine | None = request.app.state.engine
    supervisor = request.app.state.supervisor
    deaths = {"engine_restarts": supervisor.restarts, "last_engine_error": supervisor.last_error}
    if engine is None or not engine.ready:
        broken = request.app.state.startup_error or (engine and engine.broken)
        detail = request.app.state.startup_error or engine_unavailable(request.app)
        body = HealthNotReady(status="error" if broken else "starting", detail=detail, **deaths)
        return JSONResponse(body.model_dump(), status_code=503)
    return HealthResponse(
        model=request.app.state.settings.model,
        weights_version=engine.version,
        vllm_version=engine.vllm_version,
        device=engine.device,
        **deaths,
    )


TOO_LARGE = {
    413: {
        "description": "over a limit of the server: a body over --max-request-bytes, more prompts than "
        "--max-prompts, or n x prompts over --max-completions (the message names the flag)"
    }
}
STALE = {409: {"description": "the version is not greater than the one served (nothing was changed)"}}
BAD_PROMPT = {
    400: {
        "description": "a prompt is empty, too long for the context, or has token ids outside the "
        "vocabulary; or the sampling parameters are refused by the engine"
    }
}
BAD_WEIGHTS = {
    400: {
        "description": "the weights were refused before the engine was touched: not safetensors, "
        "truncated, a digest that does not match, tensors or shapes not those of the served model, a "
        "malformed digest header or Content-Length, or the client left before the whole body arrived"
    }
}
UPLOAD_TOO_LARGE = {413: {"description": "body over --max-upload-bytes"}}
NO_ROOM = {507: {"description": "the server's work folder is full: the upload was refused, nothing changed"}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "One safetensors file holding every tensor of the served model (names and shapes "
        "as GET /weights lists them; floating dtypes may differ, the engine casts).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
LOAD_REFUSED = {
    **BAD_WEIGHTS,
    403: {"description": "the server has no --checkpoint-root, or the path lies outside it"},
    404: {"description": "no such path under the checkpoint root"},
    **STALE,
    413: {"description": "body over --max-request-bytes"},
}
# Documented only: a malformed digest header is a 400 whose message gives the form (not FastAPI's 422).
SHA256_FORM = {"pattern": HEX_DIGEST_PATTERN}
BLAKE3_FORM = SHA256_FORM
CHUNKED_SHA256_FORM = {"pattern": CHUNKED_SHA256_PATTERN}
METRICS = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}},
    }
}


@protected.post("/generate", response_model=GenerateResponse, responses={**BAD_PROMPT, **TOO_LARGE})
async def generate(body: GenerateRequest, engine: Engine):
    return await engine.generate(body)


@protected.get("/weights", response_model=WeightsSpec)
def weights_spec(engine: Engine):
    return engine.weights_spec()


@protected.get("/weights/digest", response_model=WeightsDigest)
async def weights_digest(engine: Engine):
    """SHA-256 of each weight as the engine holds it now (read from the engine, not from a file), and the
    version served: a client can check that the served weights are exactly those it pushed. Costs about
    one pass over the weights (on the CPU, one small GEMM per linear layer); reloads wait for it."""
    return await engine.weights_digest()


@protected.put(
    "/weights",
    response_model=WeightsUpdate,
    responses={**BAD_WEIGHTS, **STALE, **UPLOAD_TOO_LARGE, **NO_ROOM},
    openapi_extra=UPLOAD_BODY,
)
async def put_weights(
    request: Request,
    version: Annotated[int, Query(ge=0, description="New weights version; must exceed the current one.")],
    engine: Engine,
    adapter: Annotated[bool, Query(description=ADAPTER_FIELD)] = False,
    x_weights_sha256: Annotated[
        str | None, Header(description="SHA-256 of the body, hex.", json_schema_extra=SHA256_FORM)
    ] = None,
    x_weights_chunked_sha256: Annotated[
        str | None,
        Header(
            description="'<chunk_bytes>:<hex>': SHA-256 of the concatenated SHA-256 digests of the body's "
            "consecutive chunk_bytes chunks (the last may be shorter); chunk_bytes a power of two from "
            "1 MiB to 1 GiB. Hashed in parallel; may go with the other digest headers (each one given is "
            "checked).",
            json_schema_extra=CHUNKED_SHA256_FORM,
        ),
    ] = None,
    x_weights_blake3: Annotated[
        str | None,
        Header(
            description="BLAKE3 of the body (32 bytes), hex: the cheapest digest to compute on both sides "
            "(GET /weights lists the digests checked, preferred first). May go with the other digest "
            "headers (each one given is checked).",
            json_schema_extra=BLAKE3_FORM,
        ),
    ] = None,
):
    """Body: one safetensors file with the served model's tensor names and shapes (or, with ``adapter``, a
    LoRA adapter's)."""
    engine.check_version(version)  # before receiving gigabytes
    engine.check_adapter_push(adapter)
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, "invalid Content-Length")
    started = time.perf_counter()
    try:
        staged, size = await engine.store.receive(
            request.stream(),
            int(length) if length else None,
            x_weights_sha256,
            x_weights_chunked_sha256,
            x_weights_blake3,
        )
    except ClientDisconnect as e:
        raise ApiError(400, "the client disconnected before the whole body arrived") from e
    except OSError as e:
        if (refusal := no_room(e)) is None:
            raise
        raise refusal from e
    received = time.perf_counter() - started
    update_weights = engine.update_adapter if adapter else engine.update_weights
    update = await update_weights(staged, size, version, source="upload")
    return update.model_copy(update={"receive_seconds": round(received, 6)})


@protected.post("/weights/load", response_model=WeightsUpdate, responses=LOAD_REFUSED)
async def load_weights(body: LoadWeightsRequest, request: Request, engine: Engine):
    engine.check_version(body.version)
    engine.check_adapter_push(body.adapter)
    source = engine.store.resolve_checkpoint(body.path, request.app.state.settings.checkpoint_root)
    if body.adapter and not source.is_file():
        raise ApiError(400, f"an adapter is loaded from one .safetensors file; {body.path!r} is a folder")
    staged, size = await asyncio.to_thread(engine.store.copy_in, source)
    update_weights = engine.update_adapter if body.adapter else engine.update_weights
    return await update_weights(staged, size, body.version, source="disk")


@protected.get("/metrics", response_class=Response, responses=METRICS)
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
