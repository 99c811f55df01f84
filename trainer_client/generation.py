"""The seam between the training loop and whatever produces samples: the :class:`GenerationBackend` protocol,
the :class:`GenerationBatch` a backend answers with, and the error a backend raises for a model that is not
the policy's.

The loop only calls the methods of :class:`GenerationBackend`. This module imports none of its
implementations, which live above it: :class:`~trainer_client.server_backend.ServerBackend` (one generation
server over HTTP), ``ReplicaSetBackend`` (replicas.py: several) and ``ColocatedBackend`` (colocate.py: vLLM
inside the trainer process, weights handed over in memory). ``make_backend`` (backends.py), above them all,
picks one from the trainer's config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from online_dpo_protocol.models import Completion, GenerateResponse


class IncompatibleServerError(RuntimeError):
    """The server serves a model whose tensor names or shapes differ from the policy's (or a replica one
    that differs from the first replica's)."""


@dataclass
class GenerationBatch:
    """``n`` completions for each prompt, all sampled from the weights of ``weights_version``."""

    weights_version: int
    """The backend's version of the weights that sampled this batch."""
    prompts: list[str]
    prompt_token_ids: list[list[int]]  # (B, prompt_len_i)
    completions: list[list[Completion]]  # (B, n): token_ids, text, finish_reason, logprobs
    prompt_versions: list[int] | None = None  # (B,)
    """Several replicas (trainer_client/replicas.py): the version that sampled each prompt's completions
    (``weights_version`` is their minimum); None: all ``weights_version``."""
    server_timing: dict[str, float] | None = None
    """One server: its account of the request (``weights_wait_seconds``: waiting for a reload to let go of
    the weights; ``generate_seconds``: the engine's work), which tells a slow generation from one stuck
    behind a push. None where the server does not say, with several replicas, and colocated."""
    replica_stats: dict[str, dict] | None = None
    """Several replicas: per server URL, what it did for this batch: ``prompts``, ``tokens`` (completion
    tokens), ``seconds`` (its requests' time), ``version`` (the lowest it answered with), and ``failed``
    (requests that failed and went to the others) where any did. None for one server."""

    @classmethod
    def answered(cls, prompts: Sequence[str], response: GenerateResponse) -> GenerationBatch:
        """The batch that ``response`` (of ``POST /generate``, or the colocated engine's) holds for
        ``prompts``, with the server's account of its time where it gives one."""
        return cls(
            weights_version=response.weights_version,
            prompts=list(prompts),
            prompt_token_ids=[r.prompt_token_ids for r in response.results],
            completions=[r.completions for r in response.results],
            server_timing=response.timing.model_dump() if response.timing is not None else None,
        )


class GenerationBackend(Protocol):
    def weights_spec(self) -> tuple[int, dict[str, tuple[list[int], str]]]:
        """``(version, {tensor name: (shape, dtype)})`` of the weights the backend serves."""
        ...

    def version(self) -> int:
        """The version of the weights the backend serves now."""
        ...

    def generate(
        self,
        prompts: list[str],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        logprobs: bool = False,
    ) -> GenerationBatch: ...

    max_pending: int
    """Snapshots that may wait to be pushed (each is a copy of the model)."""

    def snapshot(
        self, tensors: Mapping[str, Any], dtypes: Mapping[str, str], adapter: dict | None = None
    ) -> Any:
        """Copy ``tensors`` for a push, in the served ``dtypes``; called in the training thread. ``adapter``:
        the tensors are a LoRA adapter's, and this is its adapter_config.json (trainer_client/lora.py)."""
        ...

    def max_lora_rank(self) -> int | None:
        """The largest LoRA rank an adapter push may have (None: the backend takes no adapters)."""
        ...

    def base_version(self) -> int:
        """The version whose whole weights the backend serves (0: the model it started from): an adapter
        push is served on these."""
        ...

    def push(self, snapshot: Any, version: int) -> dict:
        """Make ``snapshot`` the served weights, reported as ``version`` from then on; the answer gives the
        ``bytes`` pushed (several replicas: each one's, under ``replicas``)."""
        ...

    def close(self) -> None: ...
