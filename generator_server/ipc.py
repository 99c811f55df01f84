"""CUDA IPC weight transfers: a trainer on the server's GPU hands over GPU buffers, never bytes.

One transfer is one session, driven by the trainer over HTTP (``routes_ipc.py``):

    begin (the whole version's manifest)  ->  bucket, bucket, ...  ->  commit      (or abort)

``begin`` checks everything that can be checked before generation stops: the sender's host and GPU, the
version, and the names, shapes and dtypes of every tensor. The session then runs as one task that holds
the engine's swap (running requests finish, new ones wait): each bucket request hands it a buffer's IPC
handle, which the worker maps, copies into the model and lets go of before the request is answered, so
the trainer may reuse the buffer. ``commit`` serves the new version once every tensor has arrived.
A session that fails, is aborted or hears nothing for ``timeout`` seconds ends the swap with an error,
which restores the previous version (or, where it cannot, answers 503 on /generate until a whole version
arrives): a half-transferred version is never served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError
from generator_server.schemas import IpcBeginRequest, IpcBucketRequest, WeightsUpdate
from generator_server.weights import DTYPE_BYTES, TORCH_NAMES, TensorInfo, check_compatible

log = logging.getLogger(__name__)
SAFETENSORS_CODES = {torch_name: code for code, torch_name in TORCH_NAMES.items()}


@dataclass
class _Bucket:
    request: IpcBucketRequest
    done: asyncio.Future


@dataclass
class _End:
    commit: bool
    done: asyncio.Future | None = None


@dataclass
class IpcSession:
    id: str
    version: int
    manifest: dict[str, TensorInfo]
    timeout: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: set[str] = field(default_factory=set)
    task: asyncio.Task | None = None
    result: WeightsUpdate | None = None


class IpcReceiver:
    """The transfer sessions of one engine (at most one holds the engine's swap at a time)."""

    def __init__(self, engine: GenerationEngine, timeout: float):
        self.engine, self.timeout = engine, timeout
        self.sessions: dict[str, IpcSession] = {}

    def begin(self, request: IpcBeginRequest) -> IpcSession:
        engine = self.engine
        if "ipc" not in engine.transports:
            raise ApiError(
                400, f"this server does not take CUDA IPC transfers (its engine runs on {engine.device}"
                f"{', split over several GPUs' if engine.settings.tensor_parallel_size > 1 else ''}); "
                f"it accepts {engine.transports}: use push: http",
            )  # fmt: skip
        if request.host_id != engine.host_id:
            raise ApiError(
                400, "the IPC handles come from another host; CUDA IPC works within one host: use http"
            )
        if request.gpu_uuid != engine.gpu_uuid:
            raise ApiError(
                400, f"the IPC buffers live on GPU {request.gpu_uuid}, the engine on {engine.gpu_uuid}; "
                "put the trainer on the server's GPU or use http",
            )  # fmt: skip
        engine.check_version(request.version)
        manifest = {}
        for t in request.tensors:
            if t.name in manifest:
                raise ApiError(400, f"tensor '{t.name}' appears twice in the manifest")
            manifest[t.name] = TensorInfo(_code(t.dtype, t.name), tuple(t.shape))
        check_compatible(manifest, engine.expected, engine.optional)
        session = IpcSession(uuid.uuid4().hex, request.version, manifest, self.timeout)
        self.sessions[session.id] = session
        session.task = asyncio.create_task(self._run(session))
        session.task.add_done_callback(_log_failure)
        return session

    async def bucket(self, session_id: str, request: IpcBucketRequest) -> int:
        session = self._get(session_id)
        _check_bucket(session, request)
        done = asyncio.get_running_loop().create_future()
        await session.queue.put(_Bucket(request, done))
        await _wait_or_end(done, session)
        return len(session.received)

    async def commit(self, session_id: str) -> WeightsUpdate:
        session = self._get(session_id)
        await session.queue.put(_End(commit=True))
        await asyncio.shield(session.task)  # its errors are the answer (400, 409, 500)
        return session.result

    async def abort(self, session_id: str) -> None:
        session = self._get(session_id)
        await session.queue.put(_End(commit=False))
        await asyncio.gather(session.task, return_exceptions=True)

    def _get(self, session_id: str) -> IpcSession:
        session = self.sessions.get(session_id)
        if session is None or session.task.done():
            raise ApiError(404, f"no open IPC transfer session {session_id!r} (it ended or timed out)")
        return session

    async def _run(self, session: IpcSession) -> None:
        """The swap of one session, from the engine's pause to the new version served (or restored)."""
        llm = self.engine._llm
        try:
            async with self.engine.swap(session.version, source="ipc") as swap:
                # vLLM's layerwise reload puts back the weights of every layer that received nothing, so
                # until the first bucket is loaded a failed session leaves the version served untouched
                swap.touched = False
                phases = dict.fromkeys(("begin", "wait", "load", "finish"), 0.0)
                clock = time.perf_counter()
                layerwise = self.engine.ipc_layerwise
                await llm.collective_rpc("receiver_begin", kwargs={"layerwise": layerwise})
                clock = _lap(phases, "begin", clock)
                try:
                    while True:
                        try:
                            item = await asyncio.wait_for(session.queue.get(), session.timeout)
                        except TimeoutError:
                            raise ApiError(
                                408, f"IPC transfer of version {session.version}: nothing arrived for "
                                f"{session.timeout:.0f} s; aborted",
                            ) from None  # fmt: skip
                        clock = _lap(phases, "wait", clock)  # for the sender's next bucket
                        if isinstance(item, _End):
                            break
                        swap.touched = True
                        await self._load(session, item)
                        clock = _lap(phases, "load", clock)
                finally:
                    if not await _finish(llm):
                        swap.touched = True
                    _lap(phases, "finish", clock)
                if not item.commit:
                    raise ApiError(409, f"IPC transfer of version {session.version} aborted by the sender")
                missing = sorted(set(session.manifest) - session.received)
                if missing:
                    raise ApiError(
                        400,
                        f"commit before every tensor arrived: {len(missing)} missing, e.g. {missing[0]!r}",
                    )
            session.result = WeightsUpdate(
                weights_version=session.version,
                bytes=_nbytes(session.manifest),
                load_seconds=swap.seconds,
                wait_seconds=swap.waited,
                phase_seconds=phases,
            )
            log.info(
                "serving weights version %d (CUDA IPC, %s load, swapped in %.3f s: %s)",
                session.version, "layerwise" if self.engine.ipc_layerwise else "direct", swap.seconds,
                ", ".join(f"{k} {v:.3f}" for k, v in phases.items()),
            )  # fmt: skip
        finally:
            self.sessions.pop(session.id, None)
            _fail_pending(session)

    async def _load(self, session: IpcSession, item: _Bucket) -> None:
        tensors = item.request.tensors
        try:
            await self.engine._llm.collective_rpc(
                "receiver_load_ipc",
                kwargs={
                    "handle": item.request.handle.model_dump(),
                    "tensors": [t.model_dump() for t in tensors],
                },
            )
        except Exception as e:
            error = ApiError(400, f"the engine could not load the bucket ({type(e).__name__}: {e})")
            item.done.set_exception(error)
            raise error from e
        session.received.update(t.name for t in tensors)
        item.done.set_result(None)


async def _finish(llm) -> bool:
    """End the worker's reload; after a failed load this may fail too, and the first error is the one
    worth reporting."""
    try:
        await llm.collective_rpc("receiver_finish")
    except Exception:
        log.exception("ending the IPC reload failed")
        return False
    return True


def _lap(phases: dict[str, float], phase: str, since: float) -> float:
    now = time.perf_counter()
    phases[phase] += now - since
    return now


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("IPC transfer session failed: %s", task.exception())


def _code(dtype: str, name: str) -> str:
    code = SAFETENSORS_CODES.get(dtype)
    if code is None:
        raise ApiError(
            400, f"tensor '{name}' has dtype {dtype!r}; expected a torch dtype name like 'bfloat16'"
        )
    return code


def _nbytes(manifest: dict[str, TensorInfo]) -> int:
    return sum(math.prod(i.shape) * DTYPE_BYTES[i.dtype] for i in manifest.values())


def _check_bucket(session: IpcSession, request: IpcBucketRequest) -> None:
    """Every tensor of the bucket is in the manifest as described there, and inside the buffer."""
    end_of_previous = 0
    for t in sorted(request.tensors, key=lambda t: t.offset):
        info = session.manifest.get(t.name)
        if info is None:
            raise ApiError(400, f"tensor '{t.name}' is not in the session's manifest")
        if (_code(t.dtype, t.name), tuple(t.shape)) != (info.dtype, info.shape):
            raise ApiError(400, f"tensor '{t.name}' differs from the manifest ({t.dtype} {t.shape})")
        if t.offset < end_of_previous:
            raise ApiError(400, f"tensor '{t.name}' overlaps the tensor before it in the buffer")
        end_of_previous = t.offset + math.prod(t.shape) * DTYPE_BYTES[info.dtype]
        if end_of_previous > request.handle.nbytes:
            raise ApiError(400, f"tensor '{t.name}' ends past the buffer's {request.handle.nbytes} bytes")


async def _wait_or_end(done: asyncio.Future, session: IpcSession) -> None:
    """Wait for ``done``; if the session ends first, answer with the reason it ended."""
    await asyncio.wait([done, session.task], return_when=asyncio.FIRST_COMPLETED)
    if done.done():
        return done.result()
    session.task.result()  # raises the session's error
    raise ApiError(409, "the IPC transfer session ended before this bucket was loaded")


def _fail_pending(session: IpcSession) -> None:
    """Requests still queued when a session ends get an answer instead of waiting forever."""
    while not session.queue.empty():
        item = session.queue.get_nowait()
        if isinstance(item, _Bucket) and not item.done.done():
            item.done.set_exception(ApiError(409, "the IPC transfer session ended before this bucket"))
