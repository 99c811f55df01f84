"""Weight uploads on a raw TCP port (``--stream-port``): the body of a ``PUT /weights`` without HTTP.

uvicorn hands a request body to the route in reads of about 256 KiB, each copied several times on the
event loop first: about 1 GB/s on the project's CPU machine, where a loopback socket moves 3-4 GB/s. On the
stream port the bytes go from the socket straight into the staged file, mapped in memory (``recv_into``),
and BLAKE3 hashes them in another thread, 8 MiB at a time, as they arrive.

One upload is one session, driven over HTTP (``routes_stream.py``), like a CUDA IPC transfer:

    begin (version, size)  ->  ticket + body on the stream port  ->  commit (BLAKE3)      (or abort)

``begin`` checks what can be checked before a byte moves (the version, the size against
``--max-upload-bytes``, room to stage it) and answers with a one-time ticket; the sender connects to the
stream port and writes the 32-byte ticket, then exactly the announced number of bytes. The body's BLAKE3 comes
with the commit (or already with begin), so a sender can start sending before its own hashing ends. ``commit``
waits for the last byte and its digest, then does with the staged file what ``PUT /weights`` does: checks
names and shapes, swaps it in, answers. The file stays mapped once served: when it comes back as the spare
(``WeightStore.promote``), the next upload but one writes into it without mapping it again. A connection with
an unknown or used ticket is closed; more bytes than announced, a connection that ends early, a digest that
does not match or nothing heard for ``--transfer-timeout`` seconds fail the session, and the served weights
never change before the commit's checks pass. The port carries no TLS and no key of its own: the ticket comes
from an authenticated request, and the BLAKE3 digest the sender gives is checked, but the bytes travel in the
clear.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError
from generator_server.schemas import StreamBeginRequest, WeightsUpdate
from generator_server.weights import WRITE_CHUNK_BYTES, UploadFile, new_blake3, no_room, parse_blake3

log = logging.getLogger(__name__)

TICKET_BYTES = 32
HASH_BYTES = WRITE_CHUNK_BYTES
"""The body is hashed in pieces of this size as they complete (one BLAKE3 call each, on every core)."""
RECV_BYTES = 64 * 2**20
"""Most bytes one ``recv_into`` may write (the kernel hands over what the socket holds)."""


@dataclass
class StreamSession:
    id: str
    ticket: bytes
    version: int
    nbytes: int
    blake3: str | None  # (None: the commit gives it)
    staged: Path
    upload: UploadFile
    done: asyncio.Future  # the body has arrived and is hashed: its receive seconds; or the failure
    hasher: object = field(default_factory=new_blake3)
    received: int = 0
    hashed: int = 0  # bytes handed to the hasher
    hashing: asyncio.Future | None = None  # the latest piece's hashing
    connection: asyncio.Transport | None = None
    first_byte: float | None = None
    heard: float = field(default_factory=time.monotonic)
    committing: bool = False
    tasks: list[asyncio.Future] = field(default_factory=list)  # its watchdog and finisher (kept referenced)

    def fail(self, error: ApiError) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        if self.connection is not None:
            self.connection.close()

    def view(self, start: int, end: int) -> memoryview:
        return memoryview(self.upload.map)[start:end]


class StreamReceiver:
    """The stream port of one engine and its upload sessions."""

    def __init__(self, engine: GenerationEngine, timeout: float):
        self.engine, self.timeout = engine, timeout
        engine.store.keep_spare = True  # uploads here write over the last superseded weights file
        self.sessions: dict[str, StreamSession] = {}
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._hash_thread = ThreadPoolExecutor(1, thread_name_prefix="stream-blake3")
        """One thread, so the pieces are hashed in order (BLAKE3 spreads each one over the cores)."""

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            self._drop(session, ApiError(503, "the server is shutting down"))
        if self._server is not None:
            self._server.close()
        self._hash_thread.shutdown(wait=False, cancel_futures=True)

    # --- the HTTP side ---------------------------------------------------------------------------------
    def begin(self, request: StreamBeginRequest) -> StreamSession:
        store = self.engine.store
        self.engine.check_version(request.version)
        if request.bytes > store.max_upload_bytes:
            raise ApiError(
                413, f"body of {request.bytes} bytes exceeds --max-upload-bytes {store.max_upload_bytes}"
            )
        digest = parse_blake3(request.blake3) if request.blake3 is not None else None
        staged = store.new_staging_dir(request.bytes, recycle=True)  # (maybe the spare file, to write over)
        try:
            upload = store.open_upload(staged / "model.safetensors", request.bytes)
        except OSError as e:
            store.discard(staged)
            if (refusal := no_room(e)) is None:
                raise
            raise refusal from e
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # (read by commit, if it comes)
        session = StreamSession(
            uuid.uuid4().hex, secrets.token_bytes(TICKET_BYTES), request.version, request.bytes, digest,
            staged, upload, done,
        )  # fmt: skip
        self.sessions[session.id] = session
        session.tasks.append(asyncio.ensure_future(self._watch(session)))
        return session

    async def commit(self, session_id: str, blake3: str | None = None) -> WeightsUpdate:
        """Wait for the body, check it against its BLAKE3 (given at begin, or here), swap it in."""
        session = self._get(session_id)
        session.committing = True
        try:
            expected = _expected_digest(session.blake3, blake3)
            receive_seconds = await asyncio.shield(session.done)
            found = session.hasher.hexdigest()
            if found != expected:
                raise ApiError(400, f"BLAKE3 mismatch: body hashes to {found}, the sender gave {expected}")
            update = await self.engine.update_weights(
                session.staged, session.nbytes, session.version, source="stream"
            )
        except BaseException as error:
            self._drop(session, error if isinstance(error, ApiError) else ApiError(500, str(error)))
            raise
        self.sessions.pop(session.id, None)
        self.engine.store.keep_upload(session.upload)  # served now: the next upload but one writes over it
        return update.model_copy(update={"receive_seconds": round(receive_seconds, 6)})

    async def abort(self, session_id: str) -> None:
        self._drop(self._get(session_id), ApiError(409, "the stream upload was aborted by the sender"))

    def _get(self, session_id: str) -> StreamSession:
        session = self.sessions.get(session_id)
        if session is None or session.committing:
            raise ApiError(404, f"no open stream upload {session_id!r} (it ended, failed or timed out)")
        return session

    def _drop(self, session: StreamSession, error: ApiError) -> None:
        """End ``session`` with ``error`` (if it has not ended) and delete what it staged."""
        session.fail(error)
        if self.sessions.pop(session.id, None) is not None:
            session.upload.close()
            self.engine.store.discard(session.staged)

    async def _watch(self, session: StreamSession) -> None:
        """Fail a session that hears nothing for ``timeout`` seconds: no byte while its body is due (a
        commit may be waiting for it), or no commit once the body is in."""
        while session.id in self.sessions and not (session.committing and session.done.done()):
            idle = time.monotonic() - session.heard
            if idle >= self.timeout:
                log.warning("stream upload of version %d: nothing for %.0f s; dropped", session.version, idle)
                self._drop(session, ApiError(408, f"stream upload: nothing arrived for {self.timeout:.0f} s"))
                return
            await asyncio.sleep(min(1.0, self.timeout - idle))

    # --- the stream side -------------------------------------------------------------------------------
    def claim(self, ticket: bytes, connection: asyncio.Transport) -> StreamSession | None:
        """The open session whose ticket this is, now bound to ``connection`` (None: no such session)."""
        for session in self.sessions.values():
            if hmac.compare_digest(session.ticket, ticket):
                if session.connection is not None:
                    return None  # one connection per ticket
                session.connection, session.heard = connection, time.monotonic()
                return session
        return None

    def arrived(self, session: StreamSession, n: int) -> None:
        """``n`` more bytes of the body are in the file: hash what completes a piece (or the body)."""
        now = time.monotonic()
        if session.first_byte is None:
            session.first_byte = now
        session.received += n
        session.heard = now
        complete = session.received == session.nbytes
        if session.received - session.hashed >= HASH_BYTES or complete:
            start, end = session.hashed, session.received
            session.hashed = end
            view = session.view(start, end)
            session.hashing = asyncio.get_running_loop().run_in_executor(
                self._hash_thread, _update, session.hasher, view
            )
        if complete:
            session.tasks.append(asyncio.ensure_future(self._finish(session, session.hashing)))

    async def _finish(self, session: StreamSession, last: asyncio.Future) -> None:
        try:
            await last  # the thread hashes in order: the last piece done means all are
        except Exception as e:  # noqa: BLE001 - the session fails with it
            session.fail(ApiError(500, f"hashing the stream upload failed: {e}"))
            return
        if not session.done.done():
            session.done.set_result(time.monotonic() - session.first_byte)

    def ended_early(self, session: StreamSession, why: str) -> None:
        if session.received < session.nbytes:
            session.fail(ApiError(400, f"{why} after {session.received} of {session.nbytes} bytes"))


def _update(hasher, view: memoryview) -> None:
    try:
        hasher.update(view)  # releases the GIL
    finally:
        view.release()


def _expected_digest(announced: str | None, given: str | None) -> str:
    """The BLAKE3 a session's body must hash to: the one its begin announced or its commit gives."""
    given = parse_blake3(given) if given is not None else None
    if announced is not None and given is not None and given != announced:
        raise ApiError(400, f"the commit's BLAKE3 {given} is not the one begin announced ({announced})")
    if (expected := announced or given) is None:
        raise ApiError(400, "no BLAKE3 for this stream upload: give it in begin or in commit")
    return expected


class _Connection(asyncio.BufferedProtocol):
    """One connection to the stream port: a ticket, then the body of that ticket's session."""

    def __init__(self, receiver: StreamReceiver):
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self.ticket = bytearray(TICKET_BYTES)
        self.got = 0  # bytes of the ticket read
        self.session: StreamSession | None = None
        self.scratch = bytearray(64 * 2**10)  # where bytes past the body go, to be refused

    def connection_made(self, transport) -> None:
        self.transport = transport
        # a connection that does not name its session in time is closed (it would hold a socket forever)
        self.deadline = asyncio.get_running_loop().call_later(self.receiver.timeout, self._no_ticket)

    def _no_ticket(self) -> None:
        if self.session is None:
            log.warning("stream port: no ticket within %.0f s; connection closed", self.receiver.timeout)
            self.transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        session = self.session
        if session is None:
            return memoryview(self.ticket)[self.got :]
        if session.received >= session.nbytes or session.done.done():
            return memoryview(self.scratch)
        end = min(session.nbytes, session.received + RECV_BYTES)
        return session.view(session.received, end)

    def buffer_updated(self, nbytes: int) -> None:
        session = self.session
        if session is None:
            self.got += nbytes
            if self.got == TICKET_BYTES:
                self.session = self.receiver.claim(bytes(self.ticket), self.transport)
                if self.session is None:
                    log.warning("stream port: a connection with an unknown or used ticket; closed")
                    self.transport.close()
            return
        if session.done.done():
            return  # failed: the connection is closing
        if session.received >= session.nbytes:
            too_long = f"the stream upload sent more than the {session.nbytes} bytes announced"
            session.fail(ApiError(400, too_long))  # (and closes the connection)
            return
        self.receiver.arrived(session, nbytes)

    def eof_received(self) -> bool:
        if self.session is not None:
            self.receiver.ended_early(self.session, "the connection ended")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
        if self.session is not None:
            self.receiver.ended_early(self.session, f"the connection was lost ({exc or 'closed'})")
