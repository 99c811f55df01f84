"""The digests of a weights body (``PUT /weights``, stream uploads): names, headers, forms and computations.

A pushed body is checked against every digest header it comes with, before the swap:

==================  ============================  ===============================================
name                header                        value
==================  ============================  ===============================================
``blake3``          ``X-Weights-BLAKE3``          BLAKE3 of the body, 64 hex digits
``chunked-sha256``  ``X-Weights-Chunked-SHA256``  ``<chunk_bytes>:<hex>`` (:func:`chunked_sha256`)
``sha256``          ``X-Weights-SHA256``          SHA-256 of the body, 64 hex digits
==================  ============================  ===============================================

``GET /weights`` lists the names a server checks (``digests``), the cheapest to compute first. The
computations here run on either side: the server as the bytes arrive, the trainer as it sends them.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor, Future
from pathlib import Path

import blake3

SHA256_HEADER = "X-Weights-SHA256"
CHUNKED_SHA256_HEADER = "X-Weights-Chunked-SHA256"
BLAKE3_HEADER = "X-Weights-BLAKE3"
DIGESTS = ("blake3", "chunked-sha256", "sha256")
"""Every body digest, the cheapest to compute first (what a server lists in ``GET /weights``): BLAKE3 hashes
about 3.5x faster than SHA-256 on one core, and spreads over several by itself."""
LEGACY_DIGESTS = ("chunked-sha256", "sha256")
"""The digests a server older than ``GET /weights``' ``digests`` checks."""
DIGEST_HEADERS = {"blake3": BLAKE3_HEADER, "chunked-sha256": CHUNKED_SHA256_HEADER, "sha256": SHA256_HEADER}

HEX_DIGEST_PATTERN = "^[0-9a-fA-F]{64}$"
"""A 32-byte digest (SHA-256, BLAKE3), as the headers and the stream routes take it (the server's parser also
takes surrounding whitespace)."""
MIN_DIGEST_CHUNK_BYTES, MAX_DIGEST_CHUNK_BYTES = 1 << 20, 1 << 30
"""The chunk sizes ``X-Weights-Chunked-SHA256`` may name: powers of two between these."""
_CHUNK_SIZES = "|".join(str(1 << k) for k in range(20, 31))
CHUNKED_SHA256_PATTERN = f"^(?:{_CHUNK_SIZES}):[0-9a-fA-F]{{64}}$"
"""``X-Weights-Chunked-SHA256``: the chunk size in decimal, one of the eleven powers of two from 1 MiB to
1 GiB (``1048576``, ``2097152``, ... ``1073741824``), a colon, 64 hexadecimal digits. (The server's parser
also takes leading zeros and spaces around the colon; the schema states the form a client writes.)"""
DIGEST_CHUNK_BYTES = 16 << 20
"""The chunk size the trainer's client uses."""
FILE_CHUNK_BYTES = 1 << 20


# --- reading the headers ----------------------------------------------------------------------------------
def parse_hex_digest(value: str, header: str = SHA256_HEADER) -> str:
    """A 32-byte digest given in ``header``: 64 hexadecimal digits (ValueError otherwise), lower-cased."""
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{header} must be 64 hexadecimal digits")
    return value


def parse_chunked_sha256(value: str) -> tuple[int, str]:
    """``X-Weights-Chunked-SHA256: <chunk_bytes>:<hex>`` -> (chunk_bytes, hex lower-cased); ValueError unless
    ``chunk_bytes`` is a power of two from 1 MiB to 1 GiB (decimal) and ``hex`` is 64 hexadecimal digits."""
    size, colon, hexdigest = value.strip().partition(":")
    size, hexdigest = size.strip(), hexdigest.strip().lower()
    form = "'<chunk_bytes>:<64 hexadecimal digits>'"
    if not colon or not (size.isascii() and size.isdigit()) or len(size) > 12:
        raise ValueError(f"{CHUNKED_SHA256_HEADER} must be {form}, not {value[:100]!r}")
    chunk_bytes = int(size)
    check_chunk_bytes(chunk_bytes, f"{CHUNKED_SHA256_HEADER}: the chunk size")
    try:
        parse_hex_digest(hexdigest)
    except ValueError:
        raise ValueError(f"{CHUNKED_SHA256_HEADER} must be {form}: the digest is not") from None
    return chunk_bytes, hexdigest


def check_chunk_bytes(chunk_bytes: int, what: str = "chunk_bytes") -> None:
    if not (MIN_DIGEST_CHUNK_BYTES <= chunk_bytes <= MAX_DIGEST_CHUNK_BYTES and chunk_bytes.bit_count() == 1):
        raise ValueError(
            f"{what} must be a power of two from {MIN_DIGEST_CHUNK_BYTES} (1 MiB) to "
            f"{MAX_DIGEST_CHUNK_BYTES} (1 GiB) bytes, not {chunk_bytes}"
        )


# --- computing them ---------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """``X-Weights-SHA256`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(FILE_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def chunked_sha256(data: bytes | memoryview, chunk_bytes: int = DIGEST_CHUNK_BYTES) -> str:
    """The ``X-Weights-Chunked-SHA256`` value of ``data``, in one thread (see :class:`ChunkedSha256`)."""
    digest = ChunkedSha256(None, chunk_bytes)
    digest.add(data)
    return digest.result()


class ChunkedSha256:
    """The ``X-Weights-Chunked-SHA256`` value of a body whose bytes are handed over in order (``add``):
    ``"<chunk_bytes>:<hex>"``, ``<hex>`` the SHA-256 of the concatenated 32-byte SHA-256 digests of the
    body's consecutive ``chunk_bytes`` chunks (the last one may be shorter; no chunk for an empty body).

    Each chunk is hashed in ``pool`` as soon as all its bytes have been added, so chunks hash in parallel
    and while later bytes are still being produced (None: in the calling thread). The buffers added are
    read in place, later: they must not change until :meth:`result` has returned."""

    name = "chunked-sha256"
    """The digest's name in ``GET /weights``' ``digests``."""

    def __init__(self, pool: Executor | None, chunk_bytes: int = DIGEST_CHUNK_BYTES):
        check_chunk_bytes(chunk_bytes)
        self.pool, self.chunk_bytes = pool, chunk_bytes
        self._pieces: list[memoryview] | None = []
        self._filled = 0
        self.chunk_digests: list[Future[bytes]] = []
        """The digests of the chunks ended so far, in order (some may still be computing)."""
        self._value: str | None = None

    def add(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            take = min(self.chunk_bytes - self._filled, view.nbytes)
            self._pieces.append(view if take == view.nbytes else view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_bytes:
                self._end_chunk()

    @staticmethod
    def hash_chunk(pieces: list[memoryview]) -> bytes:
        """The 32-byte SHA-256 of one chunk given in pieces: one update per piece (hashlib releases the GIL
        for each piece over 2 KiB); a receiver of many small pieces may rather join them first."""
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        return digest.digest()

    def _end_chunk(self) -> None:
        pieces, self._pieces, self._filled = self._pieces, [], 0
        if self.pool is not None:
            self.chunk_digests.append(self.pool.submit(self.hash_chunk, pieces))
        else:
            done: Future[bytes] = Future()
            done.set_result(self.hash_chunk(pieces))
            self.chunk_digests.append(done)

    def close(self) -> None:
        """No more bytes: the last, shorter chunk is submitted."""
        if self._pieces is None:
            return
        if self._filled:
            self._end_chunk()
        self._pieces = None  # add() after close() fails

    def value(self, chunk_digests: list[bytes]) -> str:
        """The header value from the chunks' digests."""
        return f"{self.chunk_bytes}:{hashlib.sha256(b''.join(chunk_digests)).hexdigest()}"

    def result(self) -> str:
        """The header value (closes the digest first; waits for the chunks still hashing)."""
        if self._value is None:
            self.close()
            self._value = self.value([f.result() for f in self.chunk_digests])
        return self._value


class Blake3Digest:
    """The ``X-Weights-BLAKE3`` value of a body whose bytes are handed over in order (``add``): the BLAKE3 of
    the whole body, 64 hexadecimal digits.

    BLAKE3 is one sequential stream (unlike :class:`ChunkedSha256`, whose chunks are independent), so the
    bytes are hashed in the order they are added, by ``thread`` (an executor of ONE thread, which keeps
    them in order; None: in the calling thread) as soon as they are added; BLAKE3 itself spreads each large
    buffer over ``max_threads`` cores (default: all). The buffers added are read in place, later: they must
    not change until :meth:`result` has returned."""

    name = "blake3"
    """The digest's name in ``GET /weights``' ``digests``."""

    def __init__(self, thread: Executor | None, max_threads: int = blake3.blake3.AUTO):
        self.thread = thread
        self._hasher = blake3.blake3(max_threads=max_threads)
        self._pending: list[Future[None]] = []
        self._closed = False
        self._value: str | None = None

    def add(self, data: bytes | memoryview) -> None:
        if self._closed:
            raise RuntimeError("add() after close()")
        view = memoryview(data).cast("B")
        if self.thread is None:
            self._hasher.update(view)
        else:
            self._pending.append(self.thread.submit(self._hasher.update, view))  # releases the GIL

    def close(self) -> None:
        """No more bytes."""
        self._closed = True

    def result(self) -> str:
        """The header value (closes the digest first; waits for the bytes still being hashed)."""
        if self._value is None:
            self.close()
            for done in self._pending:
                done.result()  # in order; raises what the hashing raised
            self._pending = []
            self._value = self._hasher.hexdigest()
        return self._value
