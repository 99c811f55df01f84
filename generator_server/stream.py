"""Weight uploads on a raw TCP port (``--stream-port``): the body of a ``PUT /weights`` without HTTP.

uvicorn hands a request body to the route in reads of about 256 KiB, each copied several times on the
event loop first: about 1 GB/s on the project's CPU machine, where a loopback socket moves 3-4 GB/s. On the
stream port the bytes go from the socket straight into the staged file, mapped in memory: once a connection
has named its session, a thread of its own takes the socket off the event loop and reads the body 8 MiB at a
time (``recv_into`` with ``MSG_WAITALL``: one call per piece, none of the event loop's per-read work), and
BLAKE3 hashes each piece in another thread as it completes. The event loop meanwhile stays free for
``/generate``.

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
import os
import secrets
import socket
import struct
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError
from generator_server.schemas import StreamBeginRequest, WeightsUpdate
from generator_server.weights import WRITE_CHUNK_BYTES, UploadFile, new_blake3, no_room, parse_blake3
from online_dpo_protocol import STREAM_TICKET_BYTES

log = logging.getLogger(__name__)

TICKET_BYTES = STREAM_TICKET_BYTES
PIECE_BYTES = WRITE_CHUNK_BYTES
"""The body is read and hashed in pieces of this size (one ``recv_into`` and one BLAKE3 call each)."""
WAKE_SECONDS = 1
"""A receiving thread wakes at least this often (``SO_RCVTIMEO``): to note that bytes still come on a slow
link, and to stop once its session has failed."""
RECEIVING_THREADS = 4
"""Bodies received at once; a claimed connection beyond these waits for a thread."""


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
    adapter: bool = False  # a LoRA adapter (served by GenerationEngine.update_adapter), not whole weights
    hasher: object = field(default_factory=new_blake3)
    received: int = 0
    hashed: int = 0  # bytes handed to the hasher
    sock: socket.socket | None = None  # the connection, once claimed (its receiving thread closes it)
    first_byte: float | None = None
    heard: float = field(default_factory=time.monotonic)
    committing: bool = False
    tasks: list[asyncio.Future] = field(default_factory=list)  # its watchdog and finisher (kept referenced)

    def fail(self, error: ApiError) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes its receiving thread, which closes it
            except OSError:
                pass  # closed already

    def view(self, start: int, end: int) -> memoryview:
        return memoryview(self.upload.map)[start:end]


class StreamReceiver:
    """The stream port of one engine and its upload sessions."""

    def __init__(self, engine: GenerationEngine, timeout: float):
        self.engine, self.timeout = engine, timeout
        self.sessions: dict[str, StreamSession] = {}
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._hash_thread = ThreadPoolExecutor(1, thread_name_prefix="stream-blake3")
        """One thread, so the pieces are hashed in order (BLAKE3 spreads each one over a few cores)."""
        self._receiving = ThreadPoolExecutor(RECEIVING_THREADS, thread_name_prefix="stream-receive")
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str, port: int) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            self._drop(session, ApiError(503, "the server is shutting down"))
        if self._server is not None:
            self._server.close()
        self._receiving.shutdown(wait=False, cancel_futures=True)
        self._hash_thread.shutdown(wait=False, cancel_futures=True)

    # --- the HTTP side ---------------------------------------------------------------------------------
    def begin(self, request: StreamBeginRequest) -> StreamSession:
        store = self.engine.store
        self.engine.check_version(request.version)
        self.engine.check_adapter_push(request.adapter)
        if request.bytes > store.max_upload_bytes:
            raise ApiError(
                413, f"body of {request.bytes} bytes exceeds --max-upload-bytes {store.max_upload_bytes}"
            )
        digest = parse_blake3(request.blake3) if request.blake3 is not None else None
        # From the first stream upload on, the last superseded weights file is kept for the next one to
        # write over (one more copy of the weights in memory); a server whose pushes come by PUT keeps none.
        store.keep_spare = True
        # (maybe the spare file, to write over; an adapter is small, and is served from its own folder)
        staged = store.new_staging_dir(request.bytes, recycle=not request.adapter)
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
            staged, upload, done, adapter=request.adapter,
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
            update_weights = self.engine.update_adapter if session.adapter else self.engine.update_weights
            update = await update_weights(session.staged, session.nbytes, session.version, source="stream")
        except BaseException as error:
            self._drop(session, error if isinstance(error, ApiError) else ApiError(500, str(error)))
            raise
        self.sessions.pop(session.id, None)
        if session.adapter:
            session.upload.close()  # (an adapter's file is served from its folder, never written over)
        else:
            self.engine.store.keep_upload(session.upload)  # served: the next upload but one writes over it
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
    def claim(self, ticket: bytes) -> StreamSession | None:
        """The open session whose ticket this is, if no connection has claimed it yet."""
        for session in self.sessions.values():
            if hmac.compare_digest(session.ticket, ticket):
                return None if session.sock is not None else session
        return None

    def receive(self, session: StreamSession, sock: socket.socket) -> None:
        """Bind ``sock`` (taken off the event loop) to ``session`` and read its body in a thread."""
        session.sock, session.heard = sock, time.monotonic()
        session.tasks.append(self._loop.run_in_executor(self._receiving, self._receive_body, session, sock))

    def _receive_body(self, session: StreamSession, sock: socket.socket) -> None:
        """(A receiving thread.) Read the body into the staged file piece by piece, hashing each piece as it
        completes; then report to the event loop: received and hashed, or why not."""
        hashing: Future | None = None
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", WAKE_SECONDS, 0))
            while session.received < session.nbytes:
                if session.done.done():
                    return  # failed meanwhile (timed out, aborted)
                start = session.received
                end = min(session.nbytes, start + PIECE_BYTES - start % PIECE_BYTES)
                try:
                    n = sock.recv_into(session.view(start, end), end - start, socket.MSG_WAITALL)
                except BlockingIOError:  # nothing for WAKE_SECONDS
                    continue
                if n == 0:
                    self._report(self.ended_early, session, "the connection ended")
                    return
                now = time.monotonic()
                if session.first_byte is None:
                    session.first_byte = now
                session.received, session.heard = start + n, now
                if session.received == end:  # a piece is complete
                    hashing = self._hash_thread.submit(
                        _update, session.hasher, session.view(session.hashed, end)
                    )
                    session.hashed = end
            hashing.result()  # pieces are hashed in order: the last one done means all are
            extra = _bytes_waiting(sock)  # (those that came while the last piece was hashed)
            self._report(self._body_received, session, time.monotonic() - session.first_byte, extra)
        except Exception as e:  # noqa: BLE001 - the session fails with it
            if not session.done.done():
                self._report(self.ended_early, session, f"the connection was lost ({e})")
        finally:
            sock.close()

    def _report(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def _body_received(self, session: StreamSession, seconds: float, extra: bool) -> None:
        if extra:
            session.fail(
                ApiError(400, f"the stream upload sent more than the {session.nbytes} bytes announced")
            )
        elif not session.done.done():
            session.done.set_result(seconds)

    def ended_early(self, session: StreamSession, why: str) -> None:
        if session.received < session.nbytes:
            session.fail(ApiError(400, f"{why} after {session.received} of {session.nbytes} bytes"))
        elif not session.done.done():
            session.fail(ApiError(500, f"receiving the stream upload failed: {why}"))


def _bytes_waiting(sock: socket.socket) -> bool:
    """Whether more bytes are waiting on ``sock`` now (a closed sending side is none)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1))
    except (BlockingIOError, ConnectionError):
        return False


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
    """One connection to the stream port until it names its session: its ticket, read on the event loop;
    then the socket goes to a receiving thread (``StreamReceiver.receive``)."""

    def __init__(self, receiver: StreamReceiver):
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self.ticket = bytearray(TICKET_BYTES)
        self.got = 0  # bytes of the ticket read

    def connection_made(self, transport) -> None:
        self.transport = transport
        # a connection that does not name its session in time is closed (it would hold a socket forever)
        self.deadline = asyncio.get_running_loop().call_later(self.receiver.timeout, self._no_ticket)

    def _no_ticket(self) -> None:
        log.warning("stream port: no ticket within %.0f s; connection closed", self.receiver.timeout)
        self.transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.ticket)[self.got :]  # (never more than the ticket: the body is not ours)

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.got < TICKET_BYTES:
            return
        self.deadline.cancel()
        session = self.receiver.claim(bytes(self.ticket))
        if session is None:
            log.warning("stream port: a connection with an unknown or used ticket; closed")
            self.transport.close()
            return
        # The socket leaves the event loop: a duplicate of it for the thread, this transport closed (which
        # closes only its own descriptor; nothing past the ticket has been read).
        self.transport.pause_reading()
        sock = socket.socket(fileno=os.dup(self.transport.get_extra_info("socket").fileno()))
        self.transport.abort()
        self.receiver.receive(session, sock)

    def eof_received(self) -> bool:
        return False  # (before the ticket: the connection just closes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
