"""The wire protocol between the trainer and the generation server, defined once.

Both packages import it and it imports neither (nor FastAPI, vLLM or torch: pydantic and blake3 only):

- ``models``: the request and response bodies of ``POST /generate``, ``GET /health`` and the weight routes
  (``PUT /weights``, ``POST /weights/load``, the ``/weights/stream`` and ``/weights/ipc`` sessions);
- ``digests``: the body digests of a push (SHA-256, chunked SHA-256, BLAKE3), their header names and forms;
- ``host``: the host identity a CUDA IPC sender and the server compare;
- here: the names of the weight transports and of the other headers.

The server validates with these models and its OpenAPI is generated from them; the trainer's client reads
the server's answers with them and the colocated engine answers in them. ``tests/test_protocol.py`` fails
when the server's OpenAPI and this package disagree.
"""

from online_dpo_protocol.digests import (
    BLAKE3_HEADER,
    CHUNKED_SHA256_HEADER,
    DIGEST_HEADERS,
    DIGESTS,
    LEGACY_DIGESTS,
    SHA256_HEADER,
    Blake3Digest,
    ChunkedSha256,
    chunked_sha256,
    sha256_file,
)
from online_dpo_protocol.host import host_id
from online_dpo_protocol.models import (
    Completion,
    GenerateRequest,
    GenerateResponse,
    GenerateTiming,
    HealthResponse,
    IpcBeginRequest,
    IpcBeginResponse,
    IpcBucketRequest,
    IpcBucketResponse,
    IpcBucketTensor,
    IpcHandle,
    IpcTensor,
    LoadWeightsRequest,
    PromptResult,
    PushTarget,
    StreamBeginRequest,
    StreamBeginResponse,
    StreamCommitRequest,
    TensorSpec,
    WeightsDigest,
    WeightsSpec,
    WeightsUpdate,
)

TRANSPORTS = ("http", "shared", "ipc", "stream")
"""The weight transports a server may list in ``GET /weights``' ``transports``: ``http`` (``PUT /weights``),
``shared`` (``POST /weights/load`` from a shared folder), ``ipc`` (CUDA IPC sessions, ``/weights/ipc``),
``stream`` (the body on the server's raw TCP port, ``/weights/stream``)."""
VERSION_HEADER = "X-Weights-Version"
"""The weights version that answered a request of the OpenAI-compatible ``/v1`` routes."""
STREAM_TICKET_BYTES = 32
"""Bytes of a stream upload's ticket (``StreamBeginResponse.ticket``), which its connection sends first."""

__all__ = [
    "BLAKE3_HEADER", "CHUNKED_SHA256_HEADER", "DIGESTS", "DIGEST_HEADERS", "LEGACY_DIGESTS", "SHA256_HEADER",
    "STREAM_TICKET_BYTES", "TRANSPORTS", "VERSION_HEADER", "Blake3Digest", "ChunkedSha256", "Completion",
    "GenerateRequest", "GenerateResponse", "GenerateTiming", "HealthResponse", "IpcBeginRequest",
    "IpcBeginResponse", "IpcBucketRequest", "IpcBucketResponse", "IpcBucketTensor", "IpcHandle", "IpcTensor",
    "LoadWeightsRequest", "PromptResult", "PushTarget", "StreamBeginRequest", "StreamBeginResponse",
    "StreamCommitRequest", "TensorSpec", "WeightsDigest", "WeightsSpec", "WeightsUpdate", "chunked_sha256",
    "host_id", "sha256_file",
]  # fmt: skip
