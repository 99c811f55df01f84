"""Request and response bodies of the generation server's HTTP contract (README.md, "API").

The server validates requests and answers with these models (its OpenAPI is generated from them:
``tests/test_protocol.py`` holds the two to each other); the trainer's client reads the answers with them, and
the colocated engine answers in them.

Requests forbid unknown fields, so a misspelt option is a 422 naming the field rather than silently ignored,
and are strict: ``"5"`` or ``true`` for an integer, or ``1`` for a boolean, is a 422 too (``5.0`` is an
integer, as in JSON Schema).

A few rules are stated in the schema but checked by the server rather than by the model (``_stated``), so
that breaking them keeps the answer the server has always given (a 400 naming the problem): an empty or
negative token id list, a malformed digest. The limits of one server (its ``--max-prompts``, the model's
vocabulary and context...) are not here: the server adds them to its own OpenAPI
(``generator_server/openapi.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from online_dpo_protocol.digests import HEX_DIGEST_PATTERN, LEGACY_DIGESTS


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: object) -> object:
    """JSON Schema's integers include ``5.0``; strict pydantic would refuse it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
"""An integer of a request: ``5`` or ``5.0``, never ``"5"``, ``true`` or ``5.5``."""


def _stated(**keywords: object) -> FieldInfo:
    """JSON Schema ``keywords`` stated in the schema and checked by the server (400), not by the model."""
    return Field(json_schema_extra=keywords)


Blake3Hex = Annotated[str, _stated(pattern=HEX_DIGEST_PATTERN)]
"""A BLAKE3 digest in a request body: 64 hexadecimal digits (else the server answers 400)."""


# --- /health ----------------------------------------------------------------------------------------------
ENGINE_RESTARTS = "Engines this server started after an earlier one died (0: none died)."
LAST_ENGINE_ERROR = (
    "Why the last engine that died died, e.g. 'the engine process EngineCore_DP0 (pid 1234) was killed by "
    "SIGKILL from the kernel's out-of-memory killer' or the exception it raised; null if none died."
)


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    weights_version: int
    vllm_version: str
    device: Literal["cpu", "cuda"] | str
    engine_restarts: int = Field(0, description=ENGINE_RESTARTS)
    last_engine_error: str | None = Field(None, description=LAST_ENGINE_ERROR)


class HealthNotReady(BaseModel):
    """``GET /health`` with status 503: no engine serves (yet, or again)."""

    status: Literal["starting", "error"] = Field(
        description="'starting': an engine is starting (at first, or after one died); 'error': none can start"
    )
    detail: str | None = Field(None, description="Why not, in words (the cause of death when one died).")
    engine_restarts: int = Field(0, description=ENGINE_RESTARTS)
    last_engine_error: str | None = Field(None, description=LAST_ENGINE_ERROR)


# --- /generate --------------------------------------------------------------------------------------------
EXACTLY_ONE_PROMPT_FORM = {
    "oneOf": [
        {
            "required": ["prompts"],
            "properties": {"prompts": {"type": "array"}, "prompt_token_ids": {"type": "null"}},
        },
        {
            "required": ["prompt_token_ids"],
            "properties": {"prompt_token_ids": {"type": "array"}, "prompts": {"type": "null"}},
        },
    ]
}
"""The schema's words for "exactly one of ``prompts`` or ``prompt_token_ids``" (the other absent or null)."""
GREEDY_ONE_COMPLETION_FORM = {
    "anyOf": [
        {"properties": {"temperature": {"exclusiveMinimum": 0}}},
        {"properties": {"n": {"const": 1}}},
    ]
}
"""The schema's words for "``n == 1`` when ``temperature`` is 0": a temperature above 0 (or none given: 1.0),
or n 1 (or none given)."""


class GenerateRequest(_Request):
    """A batch of prompts, sampled with the same parameters; all go to the engine at once.

    Rules across fields (422 when broken, as every schema violation): exactly one of ``prompts`` and
    ``prompt_token_ids``; ``min_tokens <= max_tokens``; ``n == 1`` when ``temperature`` is 0."""

    model_config = ConfigDict(json_schema_extra={**EXACTLY_ONE_PROMPT_FORM, **GREEDY_ONE_COMPLETION_FORM})

    prompts: list[str] | None = Field(None, min_length=1, description="Prompts as text (tokenized here).")
    # (an empty prompt, or a token id outside the vocabulary, is the server's 400, as it is for a text prompt)
    prompt_token_ids: (
        list[Annotated[list[Annotated[Int, _stated(minimum=0)]], _stated(minItems=1)]] | None
    ) = Field(None, min_length=1, description="Prompts as token ids (exclusive with prompts).")
    n: Int = Field(1, ge=1, le=1024, description="Completions per prompt.")
    max_tokens: Int = Field(64, ge=1, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: Int = Field(-1, ge=-1, description="Sample among the k likeliest tokens; -1 (or 0) = off.")
    min_tokens: Int = Field(0, ge=0, description="Tokens generated before EOS or a stop string may end.")
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Strings that end a completion (not included)."
    )
    # Bounds on the integer, not on the union (they would not reach the JSON Schema there); lt=2**63, not
    # le=2**63 - 1, which JSON Schema validators read as a float (2**63).
    seed: Annotated[int, Field(ge=0, lt=2**63), BeforeValidator(_integral)] | None = Field(
        None,
        description="Sampling seed (prompt i uses seed + i): same seed, same completions.",
    )
    logprobs: bool = Field(False, description="Return the raw log-probability of every generated token.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS until max_tokens.")

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if (self.prompts is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompts' or 'prompt_token_ids'")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"n={self.n} needs temperature > 0 (greedy decoding gives one completion)")
        return self


class Completion(BaseModel):
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    """Raw log-softmax (temperature 1, no top-p/top-k) of each token in ``token_ids``; null unless asked."""
    finish_reason: Literal["stop", "length"]


class PromptResult(BaseModel):
    prompt_token_ids: list[int]
    completions: list[Completion]


class GenerateTiming(BaseModel):
    weights_wait_seconds: float
    """Time the request waited for the weights: a reload in progress (or asked for) holds them."""
    generate_seconds: float
    """Time from holding the weights to the last completion: the engine's work on this request."""


class GenerateResponse(BaseModel):
    weights_version: int
    """The weights every completion of this response was generated with."""
    results: list[PromptResult]
    timing: GenerateTiming | None = None
    """Where the request's time went on the server (tokenizing and answering not counted)."""


# --- /weights ---------------------------------------------------------------------------------------------
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks a server's ``--max-lora-rank`` takes (vLLM's ``MaxLoRARanks``, the same in 0.26 and 0.32); an
adapter push of rank r needs a server whose ``max_lora_rank`` (``GET /weights``) is at least r."""
ADAPTER_METADATA_KEY = "adapter_config"
"""An adapter push's safetensors file holds its LoRA config (peft's adapter_config.json: ``r``,
``lora_alpha``, ``target_modules``...) as JSON under this key of its ``__metadata__``, and peft's tensors
(``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r))."""
ADAPTER_FIELD = (
    "The body is a LoRA adapter, not whole weights: peft's adapter tensors, with its adapter_config.json as "
    f"JSON under the '{ADAPTER_METADATA_KEY}' key of the safetensors metadata. Served on the base weights "
    "as the new version (a server without --enable-lora answers 400)."
)


class TensorSpec(BaseModel):
    shape: list[int]
    dtype: str


class PushTarget(BaseModel):
    """What a weight transport needs to know of a server: the part of ``GET /weights`` that says how it takes
    new weights. Its defaults are what a server older than these fields means."""

    transports: list[str] = ["http"]
    """How the server takes new weights (names in ``TRANSPORTS``): `http` (PUT /weights), `shared` (POST
    /weights/load, with a checkpoint root), `ipc` (CUDA IPC, the engine on a GPU of this host), `stream` (the
    body on a raw TCP port, with --stream-port)."""
    digests: list[str] = list(LEGACY_DIGESTS)
    """The body digests PUT /weights checks, preferred (cheapest to compute) first: `blake3`
    (X-Weights-BLAKE3), `chunked-sha256` (X-Weights-Chunked-SHA256), `sha256` (X-Weights-SHA256); the list
    is ``online_dpo_protocol.digests.DIGESTS``."""
    host_id: str | None = None
    """The server's host identity (``online_dpo_protocol.host_id()``, the kernel boot id): a CUDA IPC sender
    must run on the same host."""
    gpu_uuid: str | None = None
    """UUID of the GPU the engine runs on (null on CPU): a CUDA IPC sender's buffers must live there."""
    stream_port: int | None = None
    """TCP port of stream uploads (`--stream-port`; null when off): see /weights/stream/begin."""
    max_lora_rank: int | None = None
    """The largest LoRA rank the server takes in an adapter push (`--enable-lora --max-lora-rank N`): a push
    of only a LoRA adapter's tensors (`adapter=true`), served on the base weights as one version; null: the
    server takes no adapters (push whole weights, e.g. the adapters merged in)."""
    base_version: int = 0
    """The version whose whole weights the server serves (0: its `--model`'s own): an adapter push is served
    on these. A trainer that pushes adapters of its model needs 0."""


class WeightsSpec(PushTarget):
    weights_version: int
    tensors: dict[str, TensorSpec]
    digests: list[str]
    """Always given by this server (required here; a client reading an older one fills ``LEGACY_DIGESTS``)."""


class WeightsDigest(BaseModel):
    weights_version: int
    """The version served while the digests were taken."""
    dtype: str
    """The dtype the engine holds the weights in (a pushed file is cast to it on load)."""
    tensors: dict[str, str]
    """Parameter name as vLLM names it (``qkv_proj`` = q, k, v stacked on dim 0; ``gate_up_proj`` = gate,
    up) -> SHA-256 (hex) of its raw bytes in ``dtype``, row-major; from the engine's first worker."""


class LoadWeightsRequest(_Request):
    path: str = Field(min_length=1, description="A .safetensors file or a folder of them, on the server.")
    version: Int = Field(ge=0, description="New weights version; must exceed the current one.")
    adapter: bool = Field(False, description=ADAPTER_FIELD)


class WeightsUpdate(BaseModel):
    weights_version: int
    bytes: int
    """Bytes of safetensors received (PUT) or read (load)."""
    load_seconds: float
    """Seconds the engine was paused for the swap (staging and validation not included)."""
    wait_seconds: float | None = None
    """Seconds the swap waited, once the weights were staged, before it could pause the engine: the
    requests running when it came (and any push before it) had to finish first, since each answer comes
    from one version. During a long generation most of a push's time as the sender sees it is this wait,
    not the transfer or the swap."""
    phase_seconds: dict[str, float] | None = None
    """Where ``load_seconds`` went, for transfers that report it (CUDA IPC: begin, load, wait, finish)."""
    receive_seconds: float | None = None
    """``PUT /weights``: seconds from the first read of the body to its last byte staged and its digests
    checked, before the swap (the upload as the server saw it; None for other transfers)."""


# --- /weights/stream: uploads on the stream port -----------------------------------------------------------
class StreamBeginRequest(_Request):
    """Open an upload of one version whose body (a safetensors file, as PUT /weights takes it) will come on
    the stream port."""

    version: Int = Field(ge=0, description="New weights version; must exceed the current one.")
    bytes: Int = Field(ge=8, description="Exact size of the body in bytes.")
    blake3: Blake3Hex | None = Field(
        default=None,
        description="BLAKE3 of the body, 64 hex digits, checked before the swap; or give it with the commit.",
    )
    adapter: bool = Field(False, description=ADAPTER_FIELD)


class StreamCommitRequest(_Request):
    """Optional body of a commit."""

    blake3: Blake3Hex | None = Field(
        default=None, description="BLAKE3 of the body, 64 hex digits, if begin did not give it (or the same)."
    )


class StreamBeginResponse(BaseModel):
    session: str
    ticket: str
    """64 hex digits: its 32 bytes must be the first the connection to the stream port sends, then the body.
    Good for one connection."""
    port: int
    """The stream port (on the host of this server's URL)."""
    timeout_seconds: float
    """The session fails when nothing arrives for this long (and when no commit comes this long after the
    body)."""


# --- /weights/ipc: CUDA IPC transfer sessions ---------------------------------------------------------------
class IpcTensor(_Request):
    name: str
    shape: list[Int] = Field(description="Shape of the tensor.")
    dtype: str = Field(description="torch dtype name, e.g. 'bfloat16'.")


class IpcBeginRequest(_Request):
    """Open a transfer of one whole version: every tensor it will hold, checked before generation stops."""

    version: Int = Field(ge=0, description="New weights version; must exceed the current one.")
    host_id: str = Field(description="The sender's host identity (its kernel boot id); must be the server's.")
    gpu_uuid: str = Field(description="UUID of the GPU the buffers live on; must be the server's.")
    tensors: list[IpcTensor] = Field(min_length=1, description="Every tensor of the version.")


class IpcBeginResponse(BaseModel):
    session: str
    timeout_seconds: float
    """The session is aborted when no bucket or commit arrives for this long."""


class IpcHandle(_Request):
    """A CUDA IPC handle of a flat uint8 GPU buffer, as torch's ``reduce_tensor`` describes it; the byte
    fields are base64."""

    storage_handle: str
    storage_size_bytes: Int = Field(ge=0)
    storage_offset_bytes: Int = Field(ge=0)
    tensor_offset: Int = Field(ge=0)
    nbytes: Int = Field(ge=1, description="Bytes of the buffer.")
    ref_counter_handle: str
    ref_counter_offset: Int = Field(ge=0)
    event_handle: str | None = None
    event_sync_required: bool = False


class IpcBucketTensor(IpcTensor):
    offset: Int = Field(ge=0, description="Byte offset of the tensor in the buffer.")


class IpcBucketRequest(_Request):
    handle: IpcHandle
    tensors: list[IpcBucketTensor] = Field(min_length=1)


class IpcBucketResponse(BaseModel):
    tensors_received: int


# --- the routes -------------------------------------------------------------------------------------------
class Route(NamedTuple):
    body: type[BaseModel] | None
    """The JSON body the route takes (None: none, or not JSON)."""
    answer: type[BaseModel] | None
    """The JSON body of its 200 answer (None: none, or not JSON)."""
    transport: str | None = None
    """The weight transport (``TRANSPORTS``) the route belongs to: a server whose ``GET /weights`` does not
    list it neither takes nor documents the route. None: every server has it."""


ROUTES: dict[str, Route] = {
    "GET /health": Route(None, HealthResponse),
    "POST /generate": Route(GenerateRequest, GenerateResponse),
    "GET /weights": Route(None, WeightsSpec),
    "PUT /weights": Route(None, WeightsUpdate),  # body: a safetensors file; digests in headers (digests.py)
    "GET /weights/digest": Route(None, WeightsDigest),
    "POST /weights/load": Route(LoadWeightsRequest, WeightsUpdate, "shared"),
    "GET /metrics": Route(None, None),  # Prometheus text
    "POST /weights/ipc/begin": Route(IpcBeginRequest, IpcBeginResponse, "ipc"),
    "POST /weights/ipc/{session}/bucket": Route(IpcBucketRequest, IpcBucketResponse, "ipc"),
    "POST /weights/ipc/{session}/commit": Route(None, WeightsUpdate, "ipc"),
    "DELETE /weights/ipc/{session}": Route(None, None, "ipc"),
    "POST /weights/stream/begin": Route(StreamBeginRequest, StreamBeginResponse, "stream"),
    "POST /weights/stream/{session}/commit": Route(
        StreamCommitRequest, WeightsUpdate, "stream"
    ),  # (body optional)
    "DELETE /weights/stream/{session}": Route(None, None, "stream"),
}
"""The server's own routes (``/v1`` is vLLM's OpenAI-compatible API, with vLLM's models): what each takes and
answers with."""
OTHER_ANSWERS: dict[str, type[BaseModel]] = {"GET /health 503": HealthNotReady}
"""Answers other than a route's 200 with a model of their own (the rest are ``{"detail": "..."}``)."""
