"""The FastAPI application: routes, error answers, and the engine's life cycle.

The port opens at once and ``/health`` answers 503 while the engine starts in the background, so
clients and orchestrators can poll it rather than wait on a closed port.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from generator_server.config import ServerSettings
from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError
from generator_server.metrics import ServerMetrics
from generator_server.routes import protected, router
from generator_server.routes_ipc import router as ipc_router

log = logging.getLogger("generator_server")


def create_app(settings: ServerSettings, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The app for ``settings``; ``on_fatal`` is called if the engine cannot start."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start_engine() -> None:
            try:
                app.state.engine = await GenerationEngine.start(settings, app.state.metrics)
            except Exception as e:
                log.exception("the engine could not start")
                app.state.startup_error = f"{type(e).__name__}: {e}"
                if on_fatal is not None:
                    on_fatal()
                return
            log.info("engine ready: serving %s", settings.model)

        starting = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            starting.cancel()
            if app.state.engine is not None:
                app.state.engine.shutdown()

    app = FastAPI(title="generation server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.engine = None
    app.state.startup_error = None
    app.include_router(router)
    app.include_router(protected)
    app.include_router(ipc_router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    return app
