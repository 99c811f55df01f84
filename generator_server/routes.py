"""HTTP routes: a few lines each around :class:`~generator_server.engine.GenerationEngine`."""

from __future__ import annotations

import asyncio
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
    WeightsSpec,
    WeightsUpdate,
)

router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)])


def get_engine(request: Request) -> GenerationEngine:
    """The engine, once it is ready (503 before)."""
    engine: GenerationEngine | None = request.app.state.engine
    if engine is None or not engine.ready:
        reason = engine.broken if engine is not None and engine.broken else "the engine is starting"
        raise ApiError(503, reason)
    return engine


Engine = Annotated[GenerationEngine, Depends(get_engine)]


@router.get("/health", response_model=HealthResponse, responses={503: {"description": "not ready yet"}})
def health(request: Request):
    engine: GenerationEngine | None = request.app.state.engine
    if engine is None or not engine.ready:
        status = "error" if request.app.state.startup_error or (engine and engine.broken) else "starting"
        return JSONResponse({"status": status}, status_code=503)
    return HealthResponse(
        model=request.app.state.settings.model,
        weights_version=engine.version,
        vllm_version=engine.vllm_version,
        device=engine.device,
    )


TOO_LARGE = {
    413: {
        "description": "over a limit of the server: a body over --max-request-bytes, more prompts than "
        "--max-prompts, or n x prompts over --max-completions (the message names the flag)"
    }
}


@protected.post("/generate", response_model=GenerateResponse, responses=TOO_LARGE)
async def generate(body: GenerateRequest, engine: Engine):
    return await engine.generate(body)


@protected.get("/weights", response_model=WeightsSpec)
def weights_spec(engine: Engine):
    return engine.weights_spec()


@protected.put("/weights", response_model=WeightsUpdate)
async def put_weights(
    request: Request,
    version: Annotated[int, Query(ge=0, description="New weights version; must exceed the current one.")],
    engine: Engine,
    x_weights_sha256: Annotated[str | None, Header(description="SHA-256 of the body, hex.")] = None,
    x_weights_chunked_sha256: Annotated[
        str | None,
        Header(
            description="'<chunk_bytes>:<hex>': SHA-256 of the concatenated SHA-256 digests of the body's "
            "consecutive chunk_bytes chunks (the last may be shorter); chunk_bytes a power of two from "
            "1 MiB to 1 GiB. Hashed in parallel; may go with X-Weights-SHA256 (both are checked)."
        ),
    ] = None,
):
    """Body: one safetensors file with the served model's tensor names and shapes."""
    engine.check_version(version)  # before receiving gigabytes
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, "invalid Content-Length")
    try:
        staged, size = await engine.store.receive(
            request.stream(), int(length) if length else None, x_weights_sha256, x_weights_chunked_sha256
        )
    except ClientDisconnect as e:
        raise ApiError(400, "the client disconnected before the whole body arrived") from e
    return await engine.update_weights(staged, size, version, source="upload")


@protected.post("/weights/load", response_model=WeightsUpdate)
async def load_weights(body: LoadWeightsRequest, request: Request, engine: Engine):
    engine.check_version(body.version)
    source = engine.store.resolve_checkpoint(body.path, request.app.state.settings.checkpoint_root)
    staged, size = await asyncio.to_thread(engine.store.copy_in, source)
    return await engine.update_weights(staged, size, body.version, source="disk")


@protected.get("/metrics")
def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
