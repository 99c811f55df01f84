"""Server settings: every command-line flag, also readable from ``GENERATOR_<FLAG>`` environment variables.

This module imports neither torch nor vLLM, so ``generator-server --help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from online_dpo_protocol.models import LORA_RANKS

DType = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


class ServerSettings(BaseSettings):
    """Settings of one generation server (one model, one vLLM engine)."""

    model_config = SettingsConfigDict(env_prefix="GENERATOR_", extra="forbid", protected_namespaces=())

    model: str = Field(
        description="Hugging Face model folder (config, tokenizer, safetensors) to serve, or a GGUF file "
        "(.gguf; needs the 'gguf' extra): converted once into a bf16 folder, cached under $ONLINE_DPO_CACHE "
        "(default ~/.cache/online-dpo), and that folder is served."
    )
    served_model_name: str | None = Field(
        None,
        description="Name of the model on the OpenAI-compatible /v1 endpoints (what clients send as "
        "'model'); default: --model as given.",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 for all).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key: str | None = Field(
        None, description="When set, every endpoint but /health requires 'Authorization: Bearer KEY'."
    )
    allow_unauthenticated_remote: bool = Field(
        False,
        description="Listen beyond loopback (a --host other than 127.0.0.1, ::1 or localhost) without an "
        "--api-key, so anyone who reaches the port may generate and push weights. Without this flag such a "
        "server refuses to start.",
    )
    ssl_certfile: Path | None = Field(
        None, description="Serve HTTPS with this PEM certificate (chain); goes with --ssl-keyfile."
    )
    ssl_keyfile: Path | None = Field(None, description="Private key (PEM) of --ssl-certfile.")
    dtype: DType = Field("auto", description="Dtype the engine computes in (auto = the model's).")
    max_model_len: int | None = Field(
        None, ge=1, description="Context length in tokens, prompt plus completion (default: the model's)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of GPU memory vLLM may use (ignored on CPU)."
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="Memory for the engine's KV cache, in GiB. On a CPU the default is "
        "$VLLM_CPU_KVCACHE_SPACE if set, else an eighth of the machine's memory between 1 and 4 GiB: "
        "left to itself vLLM's CPU build takes about 85%% of the memory, and a trainer beside it runs the "
        "machine out. On a GPU the default is what --gpu-memory-utilization leaves after the weights.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Number of GPUs the model is split over.")
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="Engines in this server, each a whole copy of the model (tensor-parallel-size GPUs "
        "each; vLLM's data parallelism): requests are balanced over them, and a weight reload reaches "
        "every engine before the new version is served.",
    )
    seed: int = Field(0, description="Engine seed (requests without a seed sample from it).")
    checkpoint_root: Path | None = Field(
        None, description="POST /weights/load only reads paths inside this folder (unset: always 403)."
    )
    max_upload_bytes: int = Field(
        64 * 2**30, ge=1, description="Largest PUT /weights body accepted, in bytes (larger: 413)."
    )
    max_request_bytes: int = Field(
        16 * 2**20,
        ge=1,
        description="Largest body of a JSON request (/generate, /weights/load, /weights/ipc/*, "
        "/weights/stream/*), in bytes (larger: 413, before it is parsed). PUT /weights and the stream port "
        "have --max-upload-bytes instead.",
    )
    max_prompts: int = Field(4096, ge=1, description="Most prompts in one /generate request (more: 413).")
    max_completions: int = Field(
        65536, ge=1, description="Most completions (n x prompts) one /generate request asks for (more: 413)."
    )
    work_dir: Path | None = Field(
        None,
        description="Folder for staged uploads and the pushed weights being served. Unset (auto): a push "
        "is received in memory (a folder of the server's own in /dev/shm) when /dev/shm and the free "
        "memory have room for its Content-Length plus a quarter plus 1 GiB, else in a temporary folder "
        "on disk; /weights/load always stages on disk. Set: always this folder (on a tmpfs, in memory).",
    )
    enforce_eager: bool = Field(
        False, description="Skip torch.compile and CUDA graphs: faster start, slower generation."
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="Most sequences the engine runs at once (default: vLLM's)."
    )
    block_size: int | None = Field(
        None,
        ge=1,
        description="Tokens per KV-cache block (vLLM's own flag name); prefix caching shares whole blocks "
        "only, so smaller blocks let a prompt's samples and prompts under one system message share more "
        "of their prefill. Default: 32 on the CPU (vLLM's CPU build would take 128), vLLM's on a GPU.",
    )
    transfer_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a CUDA IPC weight transfer may go without a bucket, or a stream upload without "
        "a byte, before it is aborted.",
    )
    stream_port: int | None = Field(
        0,
        ge=0,
        le=65535,
        description="Also take weight uploads as raw TCP streams on this port of --host (0: any free port; "
        "GET /weights says which, and a trainer's push: auto takes it): the bytes go straight into the "
        "staged file instead of through the HTTP server's copies, about twice as fast as PUT /weights on "
        "the CPU. Checked like a PUT (BLAKE3, names, shapes; a one-time ticket from an authenticated "
        "request) but not encrypted: no TLS on this port, so with --ssl-certfile it is off unless given. "
        "'off' (or empty): off.",
        json_schema_extra={"flag_type": "text", "metavar": "PORT|off"},
    )
    ipc_load: Literal["auto", "layerwise", "direct"] = Field(
        "auto",
        description="How a CUDA IPC transfer enters the model: 'layerwise' (vLLM's layerwise reload, right "
        "for every model: a layer's weights are processed once it is complete), 'direct' (each tensor "
        "copied straight into the engine's parameter through the model's weight loaders: half the pause, "
        "but only right for unquantized models whose loaded weights need no processing) or 'auto' (direct "
        "for the unquantized architectures checked on a GPU, LlamaForCausalLM; else layerwise).",
    )
    enable_lora: bool = Field(
        False,
        description="Also take LoRA adapter pushes (PUT /weights?adapter=true, a stream upload or a load "
        "with adapter true): only an adapter's tensors travel, and the server serves the base weights plus "
        "that adapter (vLLM's LoRA) as the new version, on /generate and /v1 alike. vLLM's own flag name.",
    )
    max_lora_rank: int = Field(
        16,
        description="With --enable-lora: the largest adapter rank accepted, one of vLLM's "
        f"{', '.join(map(str, LORA_RANKS))} (vLLM's own flag name).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Server log level.")

    @field_validator("max_lora_rank")
    @classmethod
    def _a_vllm_rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"must be one of vLLM's {list(LORA_RANKS)}, not {value}")
        return value

    @field_validator("stream_port", mode="before")
    @classmethod
    def _off(cls, value):
        # ('off', or GENERATOR_STREAM_PORT= in an env file)
        return None if isinstance(value, str) and value.strip().lower() in ("", "off", "none") else value

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("give both --ssl-certfile and --ssl-keyfile, or neither")
        if self.ssl_certfile is not None and self.stream_port is not None:
            if "stream_port" in self.model_fields_set:
                raise ValueError(
                    "--stream-port carries weights without TLS; with --ssl-certfile leave it unset or 'off' "
                    "(PUT /weights goes over HTTPS)"
                )
            self.stream_port = None  # the default, on only where the HTTP side has no TLS either
        return self
