"""Request and response bodies of the HTTP contract (see README.md, "API").

Requests forbid unknown fields, so a misspelt option is a 422 naming the field rather than silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- /health ----------------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    weights_version: int
    vllm_version: str
    device: Literal["cpu", "cuda"] | str


# --- /generate --------------------------------------------------------------------------------------------
class GenerateRequest(_Request):
    """A batch of prompts, sampled with the same parameters; all go to the engine at once."""

    prompts: list[str] | None = Field(None, min_length=1, description="Prompts as text (tokenized here).")
    prompt_token_ids: list[list[int]] | None = Field(
        None, min_length=1, description="Prompts as token ids (exclusive with prompts)."
    )
    n: int = Field(1, ge=1, le=1024, description="Completions per prompt.")
    max_tokens: int = Field(64, ge=1, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(-1, ge=-1, description="Sample among the k likeliest tokens; -1 (or 0) = off.")
    min_tokens: int = Field(0, ge=0, description="Tokens generated before EOS or a stop string may end.")
    stop: list[str] | None = Field(None, description="Strings that end a completion (not included).")
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
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
        if self.stop is not None and any(s == "" for s in self.stop):
            raise ValueError("'stop' strings must not be empty")
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


class GenerateResponse(BaseModel):
    weights_version: int
    """The weights every completion of this response was generated with."""
    results: list[PromptResult]


# --- /weights ---------------------------------------------------------------------------------------------
class TensorSpec(BaseModel):
    shape: list[int]
    dtype: str


class WeightsSpec(BaseModel):
    weights_version: int
    tensors: dict[str, TensorSpec]
    transports: list[str] = ["http"]
    """How the server takes new weights: `http` (PUT /weights), `shared` (POST /weights/load, with a
    checkpoint root), `ipc` (CUDA IPC, the engine on a GPU of this host)."""
    host_id: str | None = None
    """The server's host identity (kernel boot id): a CUDA IPC sender must run on the same host."""
    gpu_uuid: str | None = None
    """UUID of the GPU the engine runs on (null on CPU): a CUDA IPC sender's buffers must live there."""


class LoadWeightsRequest(_Request):
    path: str = Field(min_length=1, description="A .safetensors file or a folder of them, on the server.")
    version: int = Field(ge=0, description="New weights version; must exceed the current one.")


class WeightsUpdate(BaseModel):
    weights_version: int
    bytes: int
    """Bytes of safetensors received (PUT) or read (load)."""
    load_seconds: float
    """Seconds the engine was paused for the swap (staging and validation not included)."""
    phase_seconds: dict[str, float] | None = None
    """Where ``load_seconds`` went, for transfers that report it (CUDA IPC: begin, load, wait, finish)."""


# --- /weights/ipc: CUDA IPC transfer sessions ---------------------------------------------------------------
class IpcTensor(_Request):
    name: str
    shape: list[int] = Field(description="Shape of the tensor.")
    dtype: str = Field(description="torch dtype name, e.g. 'bfloat16'.")


class IpcBeginRequest(_Request):
    """Open a transfer of one whole version: every tensor it will hold, checked before generation stops."""

    version: int = Field(ge=0, description="New weights version; must exceed the current one.")
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
    storage_size_bytes: int = Field(ge=0)
    storage_offset_bytes: int = Field(ge=0)
    tensor_offset: int = Field(ge=0)
    nbytes: int = Field(ge=1, description="Bytes of the buffer.")
    ref_counter_handle: str
    ref_counter_offset: int = Field(ge=0)
    event_handle: str | None = None
    event_sync_required: bool = False


class IpcBucketTensor(IpcTensor):
    offset: int = Field(ge=0, description="Byte offset of the tensor in the buffer.")


class IpcBucketRequest(_Request):
    handle: IpcHandle
    tensors: list[IpcBucketTensor] = Field(min_length=1)


class IpcBucketResponse(BaseModel):
    tensors_received: int
