"""Weights on disk: stage incoming safetensors, check them without loading a tensor, keep the served copy.

A safetensors file is ``[u64 little-endian header length N][N bytes of JSON header][tensor bytes]``; the
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the
start of the tensor bytes. Checking that the offsets tile the data section exactly catches truncated and
padded files, and comparing names and shapes with the served model catches the wrong model, all before
the engine is touched.

Where pushed weights live: in memory when there is room (a folder in ``/dev/shm``, a tmpfs: receiving is a
memory copy and the engine reads them back at memory speed), else on disk. See :class:`WeightStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from generator_server.errors import ApiError
from online_dpo_protocol import digests
from online_dpo_protocol.digests import (  # noqa: F401  (DIGESTS: what GET /weights lists)
    BLAKE3_HEADER,
    DIGESTS,
    SHA256_HEADER,
    ChunkedSha256,
)

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
"""Floating safetensors dtypes: the engine casts between them."""
TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 2**20
WRITE_CHUNK_BYTES = 8 * 2**20
STAGING_PREFIX, SERVED_PREFIX = "staging-", "served-v"
SPARE_FILE = "spare.safetensors"
"""In the memory folder: the weights file of a superseded version, kept for a stream upload to write over."""
MEMORY_DIR = Path("/dev/shm")
"""The tmpfs where pushes are staged in memory (when the server has no ``--work-dir``)."""
MEMORY_ROOT_PREFIX = "generator-pushes-"
"""Prefix of the memory folders (not that of the disk folder: a TMPDIR in /dev/shm must not be swept)."""
MEMORY_HEADROOM_BYTES = 2**30
"""Memory a push must leave free (besides a quarter of its own size) to be staged in memory: the engine's
reload needs some, and running out of memory kills processes where running out of disk only fails a push."""
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # (Linux)
IOV_MAX = 1024
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads hashing the chunks of ``X-Weights-Chunked-SHA256`` bodies (shared by all pushes), and the most
cores one BLAKE3 ``update`` spreads over."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    """safetensors dtype code, e.g. ``F32``."""
    shape: tuple[int, ...]


# --- reading and checking safetensors headers -----------------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Check a safetensors file's structure completely without reading tensor data; name -> TensorInfo."""
    name = path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ApiError(400, f"{name} is not a safetensors file: only {size} bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ApiError(
                400, f"{name} is not a safetensors file (or is truncated): header length {header_len} "
                f"does not fit in {size} bytes",
            )  # fmt: skip
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"{name} is not a safetensors file: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ApiError(400, f"{name} is not a safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)

    data_bytes = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for tensor, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                dtype in DTYPE_BYTES
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ApiError(400, f"{name}: malformed header entry for tensor '{tensor}': {entry!r:.200}")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or begin < 0:
            raise ApiError(
                400, f"{name}: tensor '{tensor}' has data_offsets {[begin, end]} that do not match "
                f"its shape {shape} and dtype {dtype}",
            )  # fmt: skip
        tensors[tensor] = TensorInfo(dtype, tuple(shape))
        spans.append((begin, end, tensor))

    position = 0
    for begin, end, tensor in sorted(spans):
        if begin != position:
            raise ApiError(400, f"{name}: tensor '{tensor}' starts at byte {begin}, expected {position}")
        position = end
    if position != data_bytes:
        what = "truncated" if position > data_bytes else "has trailing bytes"
        raise ApiError(
            400, f"{name} is {what}: its header describes {position} bytes of tensor data, "
            f"the file holds {data_bytes}",
        )  # fmt: skip
    return tensors


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (those the index names, if there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ApiError(400, f"{index.name} is not a valid safetensors index: {e}") from e
        return [folder / str(n) for n in names]
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def read_folder_tensors(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of all weight files of ``folder``; a name in two files is an error."""
    files = safetensors_files(folder)
    if not files:
        raise ApiError(400, f"no .safetensors file in {folder.name or folder}")
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for tensor, info in read_safetensors_header(path).items():
            if tensor in tensors:
                raise ApiError(400, f"tensor '{tensor}' appears in more than one file ({path.name})")
            tensors[tensor] = info
    return tensors


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_compatible(
    found: dict[str, TensorInfo], expected: dict[str, TensorInfo], optional: dict[str, TensorInfo]
) -> None:
    """Raise 400 unless ``found`` has exactly the expected names (plus any of ``optional``) and shapes.

    Floating dtypes may differ (the engine casts on load); any other dtype must match."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected) - set(optional))
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unknown:
        problems.append(f"unknown tensors: {_names(unknown)}")
    allowed = {**optional, **expected}
    wrong_shape = [
        f"'{n}' has shape {list(found[n].shape)}, expected {list(allowed[n].shape)}"
        for n in sorted(set(found) & set(allowed))
        if found[n].shape != allowed[n].shape
    ]
    if wrong_shape:
        problems.append("wrong shapes: " + "; ".join(wrong_shape[:8]))
    wrong_dtype = sorted(
        n
        for n in set(found) & set(allowed)
        if found[n].dtype != allowed[n].dtype and not {found[n].dtype, allowed[n].dtype} <= FLOAT_DTYPES
    )
    if wrong_dtype:
        problems.append(
            "wrong dtypes (floating point tensors may differ in precision, others must match): "
            + "; ".join(f"'{n}' is {found[n].dtype}, expected {allowed[n].dtype}" for n in wrong_dtype[:8])
        )
    if problems:
        raise ApiError(400, "weights do not match the served model: " + "; ".join(problems))


# --- the digests of a PUT /weights body ----------------------------------------------------------------
def no_room(error: OSError) -> ApiError | None:
    """The 507 for staging an upload that ran out of room (a full disk or tmpfs, a quota, a file size
    limit); None for any other error."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    return ApiError(
        507, f"no room for the upload in the server's work folder ({error.strerror}); nothing was changed: "
        "free space there or give the server a larger --work-dir",
    )  # fmt: skip


def parse_sha256(value: str, header: str = SHA256_HEADER) -> str:
    """``X-Weights-SHA256`` (or another ``header`` of a 32-byte digest): 64 hexadecimal digits (400
    otherwise), lower-cased."""
    try:
        return digests.parse_hex_digest(value, header)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def parse_blake3(value: str) -> str:
    """``X-Weights-BLAKE3``: 64 hexadecimal digits (400 otherwise), lower-cased."""
    return parse_sha256(value, BLAKE3_HEADER)


def new_blake3() -> blake3.blake3:
    """A BLAKE3 hasher that spreads a large ``update`` over up to ``HASH_THREADS`` cores (the package's own
    Rust threads, which run without the GIL). Not every core: on the 16-core H200 host, hashing a body on all
    of them while it was received slowed the receiving more than hashing it on four."""
    return blake3.blake3(max_threads=HASH_THREADS)


def parse_chunked_sha256(value: str) -> tuple[int, str]:
    """``X-Weights-Chunked-SHA256: <chunk_bytes>:<hex>`` -> (chunk_bytes, hex lower-cased); 400 unless
    ``chunk_bytes`` is a power of two from 1 MiB to 1 GiB (decimal) and ``hex`` is 64 hexadecimal digits."""
    try:
        return digests.parse_chunked_sha256(value)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


class ChunkedDigest(ChunkedSha256):
    """The chunked SHA-256 of a body arriving in pieces (:meth:`add`, in order), for an event loop: each
    chunk is hashed in ``pool`` once all its bytes are in, so chunks hash in parallel while the next ones
    arrive. A chunk's pieces are held until it is hashed; :meth:`throttle` waits while more than
    ``max_pending`` chunks are (which slows the sender down rather than holding the body in memory)."""

    def __init__(self, pool: ThreadPoolExecutor, chunk_bytes: int, max_pending: int):
        super().__init__(pool, chunk_bytes)
        self.max_pending = max_pending
        self._waiting = 0
        """Index of the first digest that may still be computing."""

    @staticmethod
    def hash_chunk(pieces: list[memoryview]) -> bytes:
        # joined first: one update gives the GIL back once, where one per piece (the network's small
        # pieces) would wait for it again after every piece (see WeightStore.receive's write)
        return hashlib.sha256(b"".join(pieces)).digest()

    async def throttle(self) -> None:
        while len(self.chunk_digests) - self._waiting > self.max_pending:
            if not self.chunk_digests[self._waiting].done():
                await asyncio.wrap_future(self.chunk_digests[self._waiting])
            self._waiting += 1

    async def hexdigest(self) -> str:
        """The hex digest of all the bytes added (the last, shorter chunk is hashed now)."""
        self.close()
        found = [await asyncio.wrap_future(f) for f in self.chunk_digests]
        return self.value(found).partition(":")[2]


# --- the weights folders this server owns --------------------------------------------------------------
@dataclass(eq=False)
class UploadFile:
    """A staged weights file held open and mapped, for an upload to write its body into (``recv_into``)."""

    fd: int
    map: mmap.mmap

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.map.close()
        except BufferError:  # a view is still held (a hash in flight): the map goes when it does
            pass
        os.close(self.fd)
        self.fd = -1


class WeightStore:
    """The folders this server owns: one staging folder per incoming weights and the folder of the weights
    being served.

    The served folder stays until newer weights are in place, so a failed reload can always go back to
    exactly the weights that were served before. A push (``PUT /weights``) is staged in memory, in a folder
    of this server's own in ``/dev/shm``, when ``work_dir`` is None and there is room for it (see
    :meth:`memory_room`), else in the work folder on disk (a temporary one when ``work_dir`` is None);
    its served copy stays where it was staged (a rename, never a copy). ``POST /weights/load`` always
    stages on disk, where it can hard-link the file. Folders are deleted when superseded; the memory folder
    goes with the server, and one left by a server that died without cleaning up (its lock is free) is
    deleted by the next server that starts."""

    def __init__(
        self,
        model_dir: Path,
        work_dir: Path | None,
        max_upload_bytes: int,
        memory_dir: Path | None = MEMORY_DIR,
    ):
        self.max_upload_bytes = max_upload_bytes
        self._owns_work_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="generator-weights-")) if work_dir is None else work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for old in self.work_dir.iterdir():  # left over by an earlier run of a server on this work dir
            if old.is_dir() and old.name.startswith((STAGING_PREFIX, SERVED_PREFIX)):
                shutil.rmtree(old, ignore_errors=True)
        self.memory_root: Path | None = None
        """This server's folder in ``memory_dir`` (None: pushes are staged on disk)."""
        self._memory_lock: int | None = None
        if work_dir is None and memory_dir is not None:
            self.memory_root, self._memory_lock = _claim_memory_root(memory_dir)
        self.served_dir = model_dir
        """Folder holding the safetensors of the weights served now (at first, the model folder)."""
        self.keep_spare = False
        """Keep a superseded in-memory weights file as the spare (see :meth:`promote`)."""
        self._kept_uploads: list[UploadFile] = []
        """Stream uploads now served or spare, still mapped (see :meth:`keep_upload`)."""
        self._hash_pool: ThreadPoolExecutor | None = None
        """Threads hashing the chunks of ``X-Weights-Chunked-SHA256`` bodies (started with the first)."""

    def memory_room(self) -> int:
        """Bytes that may be staged in memory now: free space of the tmpfs, capped by the memory the
        kernel says is available (and by this cgroup's limit): tmpfs pages are memory, and no swap may
        take them."""
        if self.memory_root is None:
            return 0
        room = min(shutil.disk_usage(self.memory_root).free, _available_memory())
        return max(0, room - MEMORY_HEADROOM_BYTES)

    def new_staging_dir(self, nbytes: int | None = None, recycle: bool = False) -> Path:
        """A new staging folder: in memory if ``nbytes`` (the size to stage) fits there with a margin of a
        quarter of itself, else in the work folder.

        The spare file (see :meth:`promote`) counts as room, and goes: with ``recycle``, into the new
        folder, named ``model.safetensors``, for the caller to write over (a stream upload: the file's
        memory pages are already there, which makes writing it about 3x faster than into fresh tmpfs
        pages); otherwise it is deleted."""
        spare = self.memory_root / SPARE_FILE if self.memory_root is not None else None
        spare_bytes = spare.stat().st_size if spare is not None and spare.exists() else 0
        in_memory = (
            self.memory_root is not None
            and nbytes is not None
            and nbytes + nbytes // 4 <= self.memory_room() + spare_bytes
        )
        path = (self.memory_root if in_memory else self.work_dir) / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        path.mkdir()
        if spare_bytes:
            if recycle and in_memory:
                os.replace(spare, path / "model.safetensors")
            else:
                spare.unlink(missing_ok=True)
                self._close_deleted_uploads()
        return path

    def open_upload(self, path: Path, nbytes: int) -> UploadFile:
        """``path`` (new, or the recycled spare to write over) made exactly ``nbytes`` long, its space
        reserved and mapped: a full disk or tmpfs is an ``OSError`` here, never a SIGBUS mid-write. The
        spare comes with the mapping its own upload left (see :meth:`keep_upload`) when it is that long."""
        kept = self._take_kept_upload(path)
        if kept is not None:
            if len(kept.map) == nbytes == os.fstat(kept.fd).st_size:
                return kept
            kept.close()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)
            # every page mapped at once: on a recycled file, 3x faster than a page fault at each first
            # write (fresh tmpfs pages are zeroed either way, here or at their first write)
            return UploadFile(fd, mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | MAP_POPULATE))
        except BaseException:
            os.close(fd)
            raise

    def keep_upload(self, upload: UploadFile) -> None:
        """Keep the mapping of an upload now served, for when its file comes back as the spare: mapping it
        again would take about 0.1 s per GB (0.05 s for 0.5 GB on the 2-core CPU). Mappings of files since
        deleted are closed (they would hold their memory)."""
        self._kept_uploads.append(upload)
        self._close_deleted_uploads()

    def _take_kept_upload(self, path: Path) -> UploadFile | None:
        try:
            found = os.stat(path)
        except FileNotFoundError:
            return None
        for kept in self._kept_uploads:
            if os.path.samestat(os.fstat(kept.fd), found):  # (its fd is open: the inode is not reused)
                self._kept_uploads.remove(kept)
                return kept
        return None

    def _close_deleted_uploads(self) -> None:
        for kept in [k for k in self._kept_uploads if os.fstat(k.fd).st_nlink == 0]:
            self._kept_uploads.remove(kept)
            kept.close()

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)
        self._close_deleted_uploads()

    def prepare(self, staged: Path, version: int) -> Path:
        """Move checked weights to the folder they will be served from as ``version`` (same parent)."""
        target = staged.parent / f"{SERVED_PREFIX}{version}"
        shutil.rmtree(target, ignore_errors=True)  # a failed earlier attempt at this version
        staged.rename(target)
        return target

    def promote(self, folder: Path) -> None:
        """``folder`` is served now; the folder served before is deleted unless it is the model folder.

        With ``keep_spare`` (a server with a stream port), the weights file of a superseded folder in
        memory is kept as the spare file, for the next stream upload to write over (see
        :meth:`new_staging_dir`): until then the server holds one more copy of the weights in memory."""
        previous, self.served_dir = self.served_dir, folder
        if previous != folder and previous.parent in (self.work_dir, self.memory_root):
            if self.keep_spare and previous.parent == self.memory_root:
                try:
                    os.replace(previous / "model.safetensors", self.memory_root / SPARE_FILE)
                except OSError:
                    pass  # (a sharded checkpoint's folder has no single file: nothing to keep)
            shutil.rmtree(previous, ignore_errors=True)
            self._close_deleted_uploads()

    def close(self) -> None:
        for kept in self._kept_uploads:
            kept.close()
        self._kept_uploads.clear()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.memory_root is not None:
            shutil.rmtree(self.memory_root, ignore_errors=True)
            os.close(self._memory_lock)
            self.memory_root = self._memory_lock = None

    # --- PUT /weights: the request body, streamed to the staging folder ------------------------------
    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        content_length: int | None,
        sha256: str | None,
        chunked_sha256: str | None = None,
        blake3: str | None = None,
    ) -> tuple[Path, int]:
        """Write the body to ``<staging>/model.safetensors``, checking its digests on the way;
        (staging dir, bytes).

        ``sha256`` (``X-Weights-SHA256``, hex) and ``blake3`` (``X-Weights-BLAKE3``, hex) are hashed in
        one pass each (BLAKE3 on every core), ``chunked_sha256`` (``X-Weights-Chunked-SHA256``,
        ``"<chunk_bytes>:<hex>"``, see :func:`chunked_sha256`) chunk by chunk in parallel as chunks
        complete; any of them may be given, and each one given is checked. Chunks are gathered into
        batches of ``WRITE_CHUNK_BYTES``; a thread writes one batch (and feeds ``sha256`` and ``blake3``)
        while the next one arrives. 413 past ``max_upload_bytes``; 400 for a malformed digest, for a body
        shorter than ``content_length`` or not matching a digest. On any error the staging folder is
        removed."""
        limit = self.max_upload_bytes
        if content_length is not None and content_length > limit:
            raise ApiError(413, f"body of {content_length} bytes exceeds --max-upload-bytes {limit}")
        sha256 = parse_sha256(sha256) if sha256 is not None else None
        chunked = parse_chunked_sha256(chunked_sha256) if chunked_sha256 is not None else None
        blake3 = parse_blake3(blake3) if blake3 is not None else None
        digest = hashlib.sha256() if sha256 is not None else None
        b3_digest = new_blake3() if blake3 is not None else None
        chunk_digest = None
        if chunked is not None:
            if self._hash_pool is None:
                self._hash_pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="receive-sha256")
            chunk_digest = ChunkedDigest(self._hash_pool, chunked[0], max_pending=HASH_THREADS + 1)
        staged = self.new_staging_dir(content_length)
        received = 0
        writing: asyncio.Task | None = None  # the thread writing (and hashing) the latest batch

        try:
            fd = os.open(staged / "model.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

            def write(batch: list[bytes]) -> None:
                if digest is not None or b3_digest is not None:
                    # One buffer per batch, not one update per received chunk (64 KiB): each update gives
                    # the GIL back and must win it again from the busy event loop, and thousands of those
                    # waits made a 2.3 GB push over a second slower on the H200 host.
                    batch = [b"".join(batch)]
                    for hasher in (digest, b3_digest):
                        if hasher is not None:
                            hasher.update(batch[0])  # releases the GIL
                _write_all(fd, batch)

            async def flush(batch: list[bytes]) -> None:
                nonlocal writing
                if writing is not None:  # batches are hashed and written in order
                    await asyncio.shield(writing)  # a cancelled request must not abandon the thread
                writing = asyncio.ensure_future(asyncio.to_thread(write, batch))

            try:
                batch, batch_bytes = [], 0
                async for chunk in chunks:
                    received += len(chunk)
                    if received > limit:
                        raise ApiError(413, f"body exceeds --max-upload-bytes {limit}")
                    if chunk_digest is not None:
                        chunk_digest.add(chunk)
                        await chunk_digest.throttle()
                    batch.append(chunk)
                    batch_bytes += len(chunk)
                    if batch_bytes >= WRITE_CHUNK_BYTES:
                        await flush(batch)
                        batch, batch_bytes = [], 0
                await flush(batch)
                await asyncio.shield(writing)
            finally:
                while writing is not None and not writing.done():  # the thread ends before the file
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(writing)
                os.close(fd)
            if content_length is not None and received != content_length:
                raise ApiError(400, f"body ended after {received} of {content_length} bytes")
            if digest is not None and digest.hexdigest() != sha256:
                raise ApiError(
                    400, f"SHA-256 mismatch: body hashes to {digest.hexdigest()}, X-Weights-SHA256 "
                    f"says {sha256}",
                )  # fmt: skip
            if chunk_digest is not None and (found := await chunk_digest.hexdigest()) != chunked[1]:
                raise ApiError(
                    400, f"chunked SHA-256 mismatch: body hashes to {chunked[0]}:{found}, "
                    f"X-Weights-Chunked-SHA256 says {chunked[0]}:{chunked[1]}",
                )  # fmt: skip
            if b3_digest is not None and (found := b3_digest.hexdigest()) != blake3:
                raise ApiError(
                    400, f"BLAKE3 mismatch: body hashes to {found}, X-Weights-BLAKE3 says {blake3}"
                )
        except BaseException:
            self.discard(staged)
            raise
        return staged, received

    # --- POST /weights/load: a file or folder on this machine -------------------------------------------
    def resolve_checkpoint(self, path: str, checkpoint_root: Path | None) -> Path:
        """The real path of ``path`` if it lies inside ``checkpoint_root`` (403 otherwise, 404 if absent)."""
        if checkpoint_root is None:
            raise ApiError(403, "loading from disk is disabled: the server has no --checkpoint-root")
        root = Path(os.path.realpath(checkpoint_root))
        target = Path(os.path.realpath(root / path))  # an absolute ``path`` replaces the root here
        if target != root and root not in target.parents:
            raise ApiError(403, f"path {path!r} is outside the checkpoint root")
        if not target.exists():
            raise ApiError(404, f"path {path!r} does not exist under the checkpoint root")
        return target

    def copy_in(self, source: Path) -> tuple[Path, int]:
        """Link (or copy) a .safetensors file, or a folder's weight files, into a new staging dir;
        (dir, bytes).

        The staged names are the server's own, so the files checked are the files loaded and later
        served, whatever happens to the source's *names* (see ``_link_or_copy``)."""
        files = safetensors_files(source) if source.is_dir() else [source]
        if not files:
            raise ApiError(400, f"no .safetensors file in {source.name}")
        staged = self.new_staging_dir()
        try:
            total = 0
            for file in files:
                dest = staged / ("model.safetensors" if source.is_file() else file.name)
                _link_or_copy(file, dest)
                total += dest.stat().st_size
        except OSError as e:
            self.discard(staged)
            raise ApiError(400, f"could not read {source.name}: {e.strerror or e}") from e
        return staged, total


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` as ``dest``, so no byte is read or written; copy it where linking fails
    (another filesystem, a file of another user under ``fs.protected_hardlinks``, no link support).

    A hard link is a second name for the same inode. Deleting the source, or replacing it by renaming a
    new file over it (what the trainer's shared-folder push does: it writes ``.NAME.tmp`` and renames it),
    leaves the staged file with the old bytes, as a copy would. Rewriting the source *in place* (opening the
    same file for writing) would change the staged bytes too: writers into the checkpoint root must write
    a new file and rename it, never overwrite a file the server may have loaded."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _write_all(fd: int, buffers: Sequence[bytes]) -> None:
    """Write ``buffers`` in order at the file's position: ``writev`` (no joining copy), resumed after
    a partial write."""
    pending = [memoryview(b) for b in buffers if len(b)]
    while pending:
        written = os.writev(fd, pending[:IOV_MAX])
        while written and written >= len(pending[0]):
            written -= len(pending.pop(0))
        if written:
            pending[0] = pending[0][written:]


def _available_memory() -> int:
    """Bytes of memory available to this process: ``MemAvailable``, capped by a cgroup v2 limit."""
    available = 2**63
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    return available


def _claim_memory_root(memory_dir: Path) -> tuple[Path | None, int | None]:
    """A new folder of this server's own in ``memory_dir``, locked (``flock``) for as long as the server
    lives; (None, None) when ``memory_dir`` is missing or not writable. First deletes the folders of servers
    that are gone: a folder whose lock can be taken has no live owner (the kernel drops a lock with its
    process, however the process ended)."""
    if not (memory_dir.is_dir() and os.access(memory_dir, os.W_OK | os.X_OK)):
        return None, None
    for old in memory_dir.glob(f"{MEMORY_ROOT_PREFIX}*"):
        with contextlib.suppress(OSError):
            fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its server lives
                shutil.rmtree(old, ignore_errors=True)
            finally:
                os.close(fd)
    for _ in range(3):  # another server starting at the same moment may sweep our new folder away
        try:
            root = Path(tempfile.mkdtemp(prefix=MEMORY_ROOT_PREFIX, dir=memory_dir))
        except OSError:
            return None, None
        with contextlib.suppress(OSError):
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a sweep holds it; then the folder may be gone
            if os.stat(root).st_ino == os.fstat(fd).st_ino:
                return root, fd
            os.close(fd)
    return None, None
