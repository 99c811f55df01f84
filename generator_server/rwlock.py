"""A readers-writer lock for asyncio that prefers the writer.

Generation requests are readers: many run at once on the same weights. A weight reload is the writer: it
waits for running requests to finish and, while it waits, holds back new ones, so a stream of requests
cannot starve a reload and no request ever sees two versions of the weights.

Releasing never awaits, so a cancelled task cannot leave the lock held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class ReadersWriterLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._waiters: list[asyncio.Future] = []

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def writers_waiting(self) -> int:
        return self._writers_waiting

    @property
    def readers_waiting(self) -> int:
        """Readers held back (by a writer that writes or waits)."""
        return self._readers_waiting

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        # The check and the registration happen without yielding, so no wake-up is lost.
        while not ready():
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            await future

    @asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        self._readers_waiting += 1
        try:
            await self._wait_until(lambda: not self._writing and self._writers_waiting == 0)
        finally:
            self._readers_waiting -= 1
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            self._wake_all()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        self._writers_waiting += 1
        try:
            await self._wait_until(lambda: not self._writing and self._readers == 0)
        finally:
            self._writers_waiting -= 1
            self._wake_all()  # readers held back by a writer that gave up may go on
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
            self._wake_all()
