"""A small typed Python client for the generation server's HTTP contract.

    from trainer_client.client import GeneratorClient

    with GeneratorClient("http://127.0.0.1:8000", api_key="...") as client:
        print(client.health().weights_version)
        out = client.generate(prompts=["Hello"], n=2, max_tokens=16, seed=0)
        print(out.results[0].completions[0].text)
        client.push_weights(model.state_dict(), version=1)

Every call has a timeout. Connection errors, timeouts and 5xx answers are retried with exponential backoff
(``max_retries`` times); a 4xx answer is never retried and raises :class:`GeneratorHTTPError` carrying the
server's message. The bodies, header names and digests are those of ``online_dpo_protocol``, which the server
validates with. It depends on httpx, pydantic and blake3 only (not on the server's FastAPI or vLLM);
``push_weights`` also needs torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from online_dpo_protocol.digests import (  # noqa: F401  (some re-exported: names this module had)
    BLAKE3_HEADER,
    CHUNKED_SHA256_HEADER,
    DIGEST_CHUNK_BYTES,
    LEGACY_DIGESTS,
    MAX_DIGEST_CHUNK_BYTES,
    MIN_DIGEST_CHUNK_BYTES,
    SHA256_HEADER,
    Blake3Digest,
    ChunkedSha256,
    sha256_file,
)
from online_dpo_protocol.digests import FILE_CHUNK_BYTES as CHUNK_BYTES
from online_dpo_protocol.models import (  # noqa: F401  (the server's contract, defined once)
    Completion,
    GenerateResponse,
    GenerateTiming,
    IpcBeginResponse,
    IpcBucketResponse,
    PromptResult,
    PushTarget,
    StreamBeginResponse,
    TensorSpec,
    WeightsSpec,
    WeightsUpdate,
)
from online_dpo_protocol.models import HealthResponse as Health

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SEND_CHUNK_BYTES = 1 << 20
"""Largest piece of a tensor handed to httpx at once (its HTTP/1.1 layer copies each piece once; larger
pieces were no faster on loopback, 16 MiB ones slower)."""
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))
"""Threads hashing chunks in parallel (hashlib releases the GIL while it hashes a large buffer)."""


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
class GeneratorError(RuntimeError):
    """Base class of the errors this client raises."""


class GeneratorUnavailable(GeneratorError):
    """The server could not be reached (or kept answering 5xx) after all retries."""


class GeneratorHTTPError(GeneratorError):
    """The server answered with an error status; ``detail`` is its message."""

    def __init__(self, status_code: int, detail: str, method: str, path: str):
        self.status_code, self.detail, self.method, self.path = status_code, detail, method, path
        super().__init__(f"{method} {path} -> {status_code}: {detail}")


class StaleVersionError(GeneratorHTTPError):
    """409: the pushed version is not greater than the version the server serves."""


def _detail(response: httpx.Response) -> str:
    """The server's error message: FastAPI's ``detail`` (a string or a list of field errors) or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # pydantic validation errors: name the fields
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(x) for x in err.get("loc", []) if x != "body")
                parts.append(f"{loc}: {err.get('msg', err)}" if loc else str(err.get("msg", err)))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


# ---------------------------------------------------------------------------------------------------------
# A safetensors body streamed from the tensors themselves
# ---------------------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "complex64": "C64", "float64": "F64", "int64": "I64", "uint64": "U64",
}  # fmt: skip
"""torch dtype name -> safetensors dtype code."""
SAFETENSORS_ORDER = (
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8",
    "U8", "BOOL",
)  # fmt: skip
"""The order of the data in a file ``safetensors.torch.save`` writes: by dtype as listed (the safetensors
library's ``Dtype`` enum, last first), then by name. The header lists the tensors in the same order."""


_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip


def safetensors_layout(
    specs: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """The first bytes of the safetensors file of tensors ``name -> (dtype code, shape)`` and the order of
    their data after it. Those bytes are the header's length (8 bytes, little-endian) and the header: compact
    JSON, names in data order, padded with spaces to a multiple of 8 bytes, as ``safetensors.torch.save``
    writes it (with ``metadata``, string -> string, first, under ``__metadata__``)."""
    rank = {code: i for i, code in enumerate(SAFETENSORS_ORDER)}
    order = sorted(specs, key=lambda name: (rank[specs[name][0]], name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        code, shape = specs[name]
        nbytes = _ITEMSIZE[code]
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def safetensors_dtype(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in SAFETENSORS_DTYPES:
        raise ValueError(f"safetensors has no dtype for torch.{name}")
    return SAFETENSORS_DTYPES[name]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, read in place (no copy): viewed as uint8 by torch first, since
    numpy has no bfloat16 or float8."""
    import torch

    if not (tensor.device.type == "cpu" and tensor.is_contiguous()):
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


class SafetensorsBody:
    """Tensors (name -> tensor) as the bytes of the safetensors file ``safetensors.torch.save`` writes for
    them, byte for byte, without writing it: the header, then each tensor's own memory (``tensor_bytes``).

    CPU tensors that are contiguous are read in place: they must not change while the body is hashed or
    sent (the trainer's snapshots never do). Others are copied to contiguous CPU memory first."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors is little-endian; this machine is not")
        self.tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        specs = {n: (safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in self.tensors.items()}
        self.head, self.order = safetensors_layout(specs, metadata)
        self.views = [tensor_bytes(self.tensors[name]) for name in self.order]
        self.nbytes = len(self.head) + sum(v.nbytes for v in self.views)

    def chunks(self) -> Iterator[memoryview]:
        """The body, from its first byte (each call starts again), in pieces of at most SEND_CHUNK_BYTES."""
        yield memoryview(self.head)
        for view in self.views:
            for start in range(0, view.nbytes, SEND_CHUNK_BYTES):
                yield view[start : start + SEND_CHUNK_BYTES]

    def sha256(self) -> str:
        """SHA-256 of the body: one pass over the tensors' memory (hashlib releases the GIL meanwhile)."""
        digest = hashlib.sha256(self.head)
        for view in self.views:
            digest.update(view)
        return digest.hexdigest()

    def blake3(self) -> str:
        """BLAKE3 of the body (``X-Weights-BLAKE3``): one pass, on every core (BLAKE3 splits large buffers
        among its own threads)."""
        digest = Blake3Digest(None)
        digest.add(self.head)
        for view in self.views:
            digest.add(view)
        return digest.result()

    def chunked_sha256(self, chunk_bytes: int = DIGEST_CHUNK_BYTES, threads: int = HASH_THREADS) -> str:
        """The body's ``X-Weights-Chunked-SHA256`` (:class:`ChunkedSha256`), its chunks hashed by
        ``threads`` threads at once."""
        with ThreadPoolExecutor(threads, thread_name_prefix="push-sha256") as pool:
            digest = ChunkedSha256(pool, chunk_bytes)
            digest.add(self.head)
            for view in self.views:
                digest.add(view)
            return digest.result()


# ---------------------------------------------------------------------------------------------------------
# generate: the arguments of POST /generate
# ---------------------------------------------------------------------------------------------------------
class GenerateApi:
    """``generate`` with the arguments of ``POST /generate`` (``GenerateRequest``'s fields, with its
    defaults), for the HTTP client and the colocated engine alike: each answers the request's body in
    ``_generate``."""

    def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_tokens: int = 0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        ignore_eos: bool = False,
    ) -> GenerateResponse:
        """``POST /generate`` for exactly one of ``prompts`` or ``prompt_token_ids``."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        body: dict[str, Any] = dict(
            n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_tokens=min_tokens, stop=None if stop is None else list(stop), seed=seed, logprobs=logprobs,
            ignore_eos=ignore_eos,
        )  # fmt: skip
        if prompts is not None:
            body["prompts"] = list(prompts)
        else:
            body["prompt_token_ids"] = [list(ids) for ids in prompt_token_ids]
        return self._generate(body)

    def _generate(self, body: dict[str, Any]) -> GenerateResponse:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------
class GeneratorClient(GenerateApi):
    """Client of one generation server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer KEY`` when set.
        timeout: seconds for one request (connect, read and write each); generation and pushes of big
            models need minutes.
        max_retries: retries after a connection error, a timeout or a 5xx answer (0 = try once).
        backoff: seconds before the first retry, doubled after each one, capped at ``backoff_max``.
        restart_timeout: beyond ``max_retries``, keep retrying a request for up to this many seconds in all
            while the server is away or restarting its engine (connection refused or dropped, 503): an
            engine restart then costs a run that long at most, not the run (0 = ``max_retries`` only).
        transport: an httpx transport to use instead of the network (for tests).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        backoff_max: float = 10.0,
        restart_timeout: float = 0.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.backoff, self.backoff_max = max_retries, backoff, backoff_max
        self.restart_timeout = restart_timeout
        self._last_unavailable: str | None = None
        """The server's last 503 message (why it could not serve): repeated if it then stops answering."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GeneratorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(
        self, method: str, path: str, retries: int | None = None, patient: bool = True, **kwargs
    ) -> httpx.Response:
        """Send one request, retrying transport errors and 5xx; raise on 4xx and on exhausted retries.
        With ``patient``, a server that is away or restarting (see ``restart_timeout``) is waited for.

        A ``content`` that is a callable is called anew for every attempt (a fresh body stream)."""
        retries = self.max_retries if retries is None else retries
        delay, started, attempt = self.backoff, time.monotonic(), 0
        while True:
            send = dict(kwargs)
            if callable(send.get("content")):
                send["content"] = send["content"]()
            try:
                response = self._http.request(method, path, **send)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                away = isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError))
                last = self._last_unavailable
                said = f" (the server had said: {last})" if last else ""
                error: Exception = GeneratorUnavailable(
                    f"{method} {self.base_url}{path} failed after {attempt + 1} attempt(s): {problem}{said}"
                )
                error.__cause__ = e
            else:
                if response.status_code < 400:
                    self._last_unavailable = None
                    return response
                detail = _detail(response)
                if response.status_code < 500:
                    error_type = StaleVersionError if response.status_code == 409 else GeneratorHTTPError
                    raise error_type(response.status_code, detail, method, path)
                problem = f"{response.status_code}: {detail}"
                away = response.status_code == 503
                if away:  # (its detail says why: the engine starting, or dead and what killed it)
                    self._last_unavailable = detail
                    error = GeneratorUnavailable(
                        f"{method} {self.base_url}{path} -> {problem} ({attempt + 1} attempt(s))"
                    )
                else:
                    error = GeneratorHTTPError(response.status_code, detail, method, path)
            waiting = patient and away and time.monotonic() - started + delay <= self.restart_timeout
            if attempt >= retries and not waiting:
                raise error
            more = f"{attempt + 1}/{retries}" if attempt < retries else f"{attempt + 1} (server away)"
            log.warning("%s %s: %s; retry %s in %.1fs", method, path, problem, more, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            attempt += 1

    # --- endpoints -------------------------------------------------------------------------------------
    def health(self, retries: int | None = None) -> Health:
        """``GET /health``; a 503 (engine still starting) is retried like any 5xx."""
        return Health.model_validate(self._request("GET", "/health", retries=retries).json())

    def wait_until_ready(self, timeout: float = 300.0, poll: float = 1.0) -> Health:
        """Poll ``/health`` until the engine is ready or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Health.model_validate(self._request("GET", "/health", retries=0, patient=False).json())
            except GeneratorUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(poll)

    def _generate(self, body: dict[str, Any]) -> GenerateResponse:
        """``POST /generate`` (see :meth:`GenerateApi.generate`): the server checks the body."""
        return GenerateResponse.model_validate(self._request("POST", "/generate", json=body).json())

    def weights_spec(self, retries: int | None = None) -> WeightsSpec:
        """``GET /weights``: the served version and the tensor names, shapes and dtypes a push must hold."""
        spec = self._request("GET", "/weights", retries=retries).json()
        if isinstance(spec, dict):  # a server older than `digests` checks these
            spec.setdefault("digests", list(LEGACY_DIGESTS))
        return WeightsSpec.model_validate(spec)

    def push_weights_file(self, path: str | Path, version: int, sha256: str | None = None) -> WeightsUpdate:
        """``PUT /weights?version=V``: stream a safetensors file, its SHA-256 in ``X-Weights-SHA256``."""
        path = Path(path)
        size = path.stat().st_size
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            SHA256_HEADER: sha256 or sha256_file(path),
        }
        response = self._request(
            "PUT",
            "/weights",
            params={"version": version},
            headers=headers,
            content=lambda: _file_chunks(path),
        )
        return WeightsUpdate.model_validate(response.json())

    def push_weights(
        self, state_dict: Mapping[str, Any], version: int, tmp_dir: str | Path | None = None
    ) -> WeightsUpdate:
        """Push ``state_dict`` (name -> tensor) as ``version``: a safetensors body streamed from the tensors'
        memory (see :class:`SafetensorsBody`), no file. ``tmp_dir`` is ignored (pushes once went through a
        temporary file)."""
        return self.push_body(SafetensorsBody(state_dict), version)

    def push_body(
        self,
        body: SafetensorsBody,
        version: int,
        sha256: str | None = None,
        chunked_sha256: str | None = None,
        blake3: str | None = None,
        adapter: bool = False,
    ) -> WeightsUpdate:
        """``PUT /weights?version=V`` of ``body`` (with ``adapter``: a LoRA adapter's, its config in the
        metadata; ``&adapter=true``) with its digests, each one given in its header: ``sha256``
        in ``X-Weights-SHA256``, ``chunked_sha256`` (``"<chunk_bytes>:<hex>"``, see :class:`ChunkedSha256`)
        in ``X-Weights-Chunked-SHA256``, ``blake3`` (hex, see :class:`Blake3Digest`) in ``X-Weights-BLAKE3``
        (send it only to a server whose ``GET /weights`` lists ``blake3``: an older one ignores it). None
        given: the chunked SHA-256 (servers older than ``digests`` check it too), computed here first in
        parallel (:meth:`SafetensorsBody.chunked_sha256`). A retry sends the body again from its first
        byte."""
        if sha256 is None and chunked_sha256 is None and blake3 is None:
            chunked_sha256 = body.chunked_sha256()
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(body.nbytes)}
        if sha256 is not None:
            headers[SHA256_HEADER] = sha256
        if chunked_sha256 is not None:
            headers[CHUNKED_SHA256_HEADER] = chunked_sha256
        if blake3 is not None:
            headers[BLAKE3_HEADER] = blake3
        params = {"version": version, **({"adapter": "true"} if adapter else {})}
        response = self._request("PUT", "/weights", params=params, headers=headers, content=body.chunks)
        return WeightsUpdate.model_validate(response.json())

    def load_weights(self, path: str, version: int, adapter: bool = False) -> WeightsUpdate:
        """``POST /weights/load``: reload from a file or folder on the server's own disk (``adapter``: a
        LoRA adapter's file)."""
        body = {"path": str(path), "version": version, **({"adapter": True} if adapter else {})}
        response = self._request("POST", "/weights/load", json=body)
        return WeightsUpdate.model_validate(response.json())

    # --- CUDA IPC transfer sessions (see trainer_client/transports/ipc.py) -------------------------------
    def ipc_begin(self, version: int, host_id: str, gpu_uuid: str, tensors: list[dict]) -> str:
        """``POST /weights/ipc/begin``: open a transfer session for ``version`` (the whole manifest is
        checked first); returns the session id."""
        body = {"version": version, "host_id": host_id, "gpu_uuid": gpu_uuid, "tensors": tensors}
        answer = self._request("POST", "/weights/ipc/begin", json=body).json()
        return IpcBeginResponse.model_validate(answer).session

    def ipc_bucket(self, session: str, handle: dict, tensors: list[dict]) -> int:
        """``POST /weights/ipc/{session}/bucket``: the server loads the bucket's tensors and lets go of the
        buffer before it answers. Returns the number of tensors received so far."""
        body = {"handle": handle, "tensors": tensors}
        answer = self._request("POST", f"/weights/ipc/{session}/bucket", json=body).json()
        return IpcBucketResponse.model_validate(answer).tensors_received

    def ipc_commit(self, session: str) -> WeightsUpdate:
        """``POST /weights/ipc/{session}/commit``: serve the new version (every tensor must have arrived)."""
        return WeightsUpdate.model_validate(self._request("POST", f"/weights/ipc/{session}/commit").json())

    def ipc_abort(self, session: str) -> None:
        """``DELETE /weights/ipc/{session}``: give up; the server goes back to the version it served."""
        self._request("DELETE", f"/weights/ipc/{session}", retries=0)

    # --- stream uploads (see trainer_client/transports/stream.py) ---------------------------------------
    def stream_begin(
        self, version: int, nbytes: int, blake3_hex: str | None = None, adapter: bool = False
    ) -> dict:
        """``POST /weights/stream/begin``: open an upload of ``nbytes`` (whose BLAKE3 is ``blake3_hex``, or
        give it to :meth:`stream_commit`; ``adapter``: a LoRA adapter's body); returns ``session``,
        ``ticket`` (hex), ``port`` and ``timeout_seconds``."""
        body = {"version": version, "bytes": nbytes, **({"adapter": True} if adapter else {})}
        if blake3_hex is not None:
            body["blake3"] = blake3_hex
        answer = self._request("POST", "/weights/stream/begin", json=body).json()
        return StreamBeginResponse.model_validate(answer).model_dump()

    def stream_commit(self, session: str, blake3_hex: str | None = None) -> WeightsUpdate:
        """``POST /weights/stream/{session}/commit``: wait for the body, check it (against ``blake3_hex``
        if begin did not have it), serve it."""
        body = {"blake3": blake3_hex} if blake3_hex is not None else None
        response = self._request(
            "POST", f"/weights/stream/{session}/commit", json=body, retries=0
        )  # (one session: never retried)
        return WeightsUpdate.model_validate(response.json())

    def stream_abort(self, session: str) -> None:
        """``DELETE /weights/stream/{session}``: give up the upload (the served version stays)."""
        self._request("DELETE", f"/weights/stream/{session}", retries=0)

    def metrics(self) -> str:
        """``GET /metrics`` (Prometheus text format)."""
        return self._request("GET", "/metrics").text
