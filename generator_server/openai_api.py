"""OpenAI-compatible endpoints on the server's own engine: ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, in the OpenAI error format.

The routes themselves (``openai_routes``) are vLLM's OpenAI serving layer bound to the running engine.
Importing that layer takes seconds, so it is imported and its routes added once the engine is up
(:func:`attach`), keeping the port's opening immediate; until then every ``/v1`` path answers 503.
This module imports no vLLM.
"""

from __future__ import annotations

import asyncio
import importlib

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from generator_server.auth import require_api_key
from generator_server.config import ServerSettings
from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError

"""Response header of every /v1 answer from the engine: the weights version that generated all of it."""
STARTING_PATH = "/v1/{path:path}"


def openai_error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _kind(status: int) -> str:
    kinds = {401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLargeError"}
    return kinds.get(status, "ServiceUnavailableError" if status >= 500 else "BadRequestError")


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


class OpenAIErrors(APIRoute):
    """A route whose failures (a bad body, no key, the engine not ready, a limit) answer as OpenAI errors,
    which OpenAI clients read; :meth:`other_error` answers the rest."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def handle_with_openai_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as e:
                return openai_error(400, _validation_message(e), "BadRequestError")
            except HTTPException as e:  # Starlette's: FastAPI's own (a body it cannot parse) and auth's
                return openai_error(e.status_code, str(e.detail), _kind(e.status_code), e.headers)
            except ApiError as e:
                return openai_error(e.status_code, e.message, _kind(e.status_code))
            except Exception as e:
                return self.other_error(request, e)

        return handle_with_openai_errors

    def other_error(self, request: Request, error: Exception) -> Response:
        raise error


starting = APIRouter(route_class=OpenAIErrors, dependencies=[Depends(require_api_key)])


@starting.api_route(STARTING_PATH, methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def engine_starting(request: Request):
    """Every /v1 path until :func:`attach` replaces this route with the real ones."""
    state = request.app.state
    if state.openai_error:
        raise ApiError(503, f"the OpenAI-compatible endpoints could not start: {state.openai_error}")
    if state.startup_error:
        raise ApiError(503, f"the engine could not start: {state.startup_error}")
    raise ApiError(503, "the engine is starting")


async def attach(app: FastAPI, engine: GenerationEngine, settings: ServerSettings) -> None:
    """Bind vLLM's OpenAI serving layer to ``engine`` and serve its routes in place of the 503 stand-in."""
    routes = await asyncio.to_thread(importlib.import_module, "generator_server.openai_routes")
    attached = getattr(app.state, "openai", None) is not None
    app.state.openai = routes.OpenAIServing.build(engine, settings)
    if attached:  # a new engine after one died: the routes are there, now bound to it
        return
    app.include_router(routes.router)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != STARTING_PATH]
    app.openapi_schema = None  # FastAPI caches the schema: the next /openapi.json has the new routes
