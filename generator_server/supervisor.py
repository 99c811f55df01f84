"""The engine's life in the server: start it, watch it, and when it dies say why and start a new one.

An engine dies when its process is killed (the kernel's out-of-memory killer, an orchestrator) or raises
(a bug reached by some request). The server then logs the cause, answers 503 naming it on every route
that needs the engine (``/health`` says it too, in ``last_engine_error``) and builds a new engine from the
model folder, serving version 0 as a restarted server would: the trainer waits for it (its
``server_restart_timeout``), sees the version and pushes its current weights. If the new engine cannot
start either, the server exits non-zero, as it does when the first one cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from generator_server.config import ServerSettings
from generator_server.engine import GenerationEngine
from generator_server.engine_deaths import DeathWatch
from generator_server.openai_api import attach as attach_openai_api
from generator_server.stream import StreamReceiver

log = logging.getLogger("generator_server")

WATCH_SECONDS = 0.5
"""How often the engine's liveness is checked (a flag vLLM's own process monitor sets)."""


class EngineSupervisor:
    """Keeps ``app.state.engine`` serving; :attr:`restarts` and :attr:`last_error` are what ``/health`` says
    about past deaths."""

    def __init__(self, app: FastAPI, settings: ServerSettings, on_fatal: Callable[[], None] | None):
        self.app, self.settings, self.on_fatal = app, settings, on_fatal
        self.restarts = 0
        """Engines started after the first one died."""
        self.last_error: str | None = None
        """Why the last engine that died died (None: none has)."""
        self.restarting = False
        self._cause_read = asyncio.Event()
        """Set once the cause of the current engine's death is in :attr:`last_error`."""
        self._folder = Path(tempfile.mkdtemp(prefix="generator-engine-"))
        self._stream_port = settings.stream_port
        """The stream port to open: once bound, the same number again for a restarted engine."""

    async def run(self) -> None:
        """Start the engine, then restart it whenever it dies, until cancelled (the server stops)."""
        try:
            while True:
                watch = DeathWatch(self._folder / "engine-error.txt")
                engine = await self._start()
                if engine is None:
                    return
                self.restarting = False
                self._cause_read.clear()
                while engine.llm is not None and not engine.llm.errored:
                    await asyncio.sleep(WATCH_SECONDS)
                if engine.llm is None:  # shut down from outside
                    return
                self.last_error = await asyncio.to_thread(watch.cause, engine.llm)
                self.restarting = True
                self._cause_read.set()
                log.error("the engine died: %s; starting a new one", self.last_error)
                await self._stop(engine)
                self.restarts += 1
        finally:
            with contextlib.suppress(OSError):
                for path in self._folder.iterdir():
                    path.unlink()
                self._folder.rmdir()

    async def death_cause(self, timeout: float = 15.0) -> str | None:
        """Why the engine died, once read (waiting up to ``timeout`` seconds for it): for the answer of a
        request the engine died under."""
        try:
            await asyncio.wait_for(self._cause_read.wait(), timeout)
        except TimeoutError:
            pass
        return self.last_error

    async def _start(self) -> GenerationEngine | None:
        """A ready engine in ``app.state.engine``, with the OpenAI routes and the stream port bound to it;
        None (and ``on_fatal`` called) if it could not start."""
        app, settings = self.app, self.settings
        try:
            engine = await GenerationEngine.start(settings, app.state.metrics)
            try:
                await attach_openai_api(app, engine, settings)
            except Exception as e:  # /generate and the reloads do not need them: serve without
                log.exception("the OpenAI-compatible /v1 endpoints could not start")
                app.state.openai_error = f"{type(e).__name__}: {e}"
            except BaseException:
                engine.shutdown()
                raise
            if self._stream_port is not None:
                receiver = StreamReceiver(engine, settings.transfer_timeout)
                try:
                    port = await receiver.start(settings.host, self._stream_port)
                except BaseException:
                    engine.shutdown()
                    raise
                engine.stream_port = self._stream_port = port
                app.state.stream_receiver = receiver
                log.info("stream uploads on port %d", engine.stream_port)
            # A full garbage collection over the objects vLLM, torch and transformers leave in this process
            # (about 640k) took the event loop 1.1-1.6 s on the 2-core CPU, and big requests trigger them:
            # /health and /metrics waited. Frozen, they are skipped (vLLM's own API server does the same).
            gc.collect()
            gc.freeze()
            app.state.metrics.weights_version.set(engine.version)
            app.state.engine = engine
        except Exception as e:
            log.exception("the engine could not start")
            app.state.startup_error = f"{type(e).__name__}: {e}"
            if self.on_fatal is not None:
                self.on_fatal()
            return None
        what = "a new engine" if self.restarts else "engine"
        log.info("%s ready: serving %s", what, settings.model)
        return engine

    async def _stop(self, engine: GenerationEngine) -> None:
        """Take ``engine`` (dead) out of service: requests answer 503 from here until a new one is ready."""
        self.app.state.engine = None
        receiver, self.app.state.stream_receiver = self.app.state.stream_receiver, None
        if receiver is not None:
            await receiver.close()
        await asyncio.to_thread(engine.shutdown)
