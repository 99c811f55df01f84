"""The FastAPI application: routes, error answers, and the engine's life cycle.

The port opens at once and ``/health`` answers 503 while the engine starts in the background, so
clients and orchestrators can poll it rather than wait on a closed port; an engine that dies is replaced
the same way (``supervisor.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from generator_server.config import ServerSettings
from generator_server.errors import ApiError
from generator_server.metrics import ServerMetrics
from generator_server.openai_api import starting as openai_starting
from generator_server.openapi import install as install_openapi
from generator_server.routes import engine_unavailable, protected, router
from generator_server.routes_ipc import router as ipc_router
from generator_server.routes_stream import router as stream_router
from generator_server.supervisor import EngineSupervisor

log = logging.getLogger("generator_server")


def create_app(settings: ServerSettings, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The app for ``settings``; ``on_fatal`` is called if the engine cannot start."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        supervising = asyncio.create_task(app.state.supervisor.run())
        try:
            yield
        finally:
            supervising.cancel()
            if app.state.stream_receiver is not None:
                await app.state.stream_receiver.close()
            if app.state.engine is not None:
                app.state.engine.shutdown()

    app = FastAPI(title="generation server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.engine = None
    app.state.startup_error = None
    app.state.openai_error = None
    app.state.stream_receiver = None
    app.state.openapi_engine = None  # the engine app.openapi_schema was built for (openapi.py)
    app.state.supervisor = EngineSupervisor(app, settings, on_fatal)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.include_router(router)
    app.include_router(protected)
    app.include_router(openai_starting)  # 503 until the engine is up, then the OpenAI-compatible routes
    app.include_router(ipc_router)
    app.include_router(stream_router)
    install_openapi(app)  # /openapi.json: this server's routes and limits

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 405:  # Starlette's Allow names only the first route of the path
            routes = [r for r in request.app.routes if isinstance(r, Route) and r.methods]
            path = next((r.path for r in routes if r.path_regex.match(request.url.path)), None)
            allowed = sorted({m for r in routes if r.path == path for m in r.methods})
            if allowed:
                error.headers = {**(error.headers or {}), "Allow": ", ".join(allowed)}
        return await http_exception_handler(request, error)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        engine = request.app.state.engine
        llm = engine.llm if engine is not None else None
        dead = type(error).__name__ == "EngineDeadError" or (llm is not None and llm.errored)
        if dead or (engine is not None and not engine.ready):
            if dead:  # say what killed it (the supervisor reads that within seconds, then starts a new one)
                await request.app.state.supervisor.death_cause()
            return JSONResponse({"detail": engine_unavailable(request.app)}, status_code=503)
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    return app


class BodyLimit:
    """413 for a request body over ``limit`` bytes (``--max-request-bytes``) before the app reads or parses
    it: by its Content-Length, or, for a body without one (chunked), by counting it as it arrives (such a
    body, at most ``limit`` bytes, is then handed on in one piece). ``PUT /weights`` is left alone: it
    streams gigabytes to its staging file under ``--max-upload-bytes``."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "PUT" and scope["path"] == "/weights"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await JSONResponse({"detail": "invalid Content-Length"}, 400)(scope, receive, send)
            elif int(length) > self.limit:
                await self._refuse(scope, receive, send, f"{int(length)} bytes")
            else:  # the HTTP server delivers no more than Content-Length
                await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send, f"more than {self.limit} bytes")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        message = (
            f"request body of {size} is over this server's limit of {self.limit} bytes "
            "(--max-request-bytes); split the request"
        )
        await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
