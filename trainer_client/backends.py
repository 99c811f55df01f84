"""Generation backends: the one seam between the training loop and whatever produces samples.

The loop only calls the methods of :class:`GenerationBackend`. ``mode: server`` implements them with the
HTTP :class:`~trainer_client.client.GeneratorClient` for generation and a weight transport
(``trainer_client/transports``) for pushes, over one server or several replicas
(``trainer_client/replicas.py``); ``mode: colocate`` with vLLM inside the trainer process
(``trainer_client/colocate.py``), weights handed over in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from trainer_client.client import (
    Completion,
    GeneratorClient,
    GeneratorHTTPError,
    GeneratorUnavailable,
    PushTarget,
)
from trainer_client.config import TrainConfig
from trainer_client.transports import WeightTransport, choose_transport, make_transport
from trainer_client.transports.stream import StreamUnreachable

log = logging.getLogger(__name__)


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

    def snapshot(self, tensors: Mapping[str, Any], dtypes: Mapping[str, str]) -> Any:
        """Copy ``tensors`` for a push, in the served ``dtypes``; called in the training thread."""
        ...

    def push(self, snapshot: Any, version: int) -> dict:
        """Make ``snapshot`` the served weights, reported as ``version`` from then on."""
        ...

    def close(self) -> None: ...


class ServerBackend:
    """Generation over HTTP by a running generation server (the whole batch in one request; with a seed,
    the server samples prompt ``i`` with ``seed + i``). Weights go up by the transport ``push`` names
    (``trainer_client/transports``), chosen once the server has said what it accepts (``GET /weights``)."""

    def __init__(self, client: GeneratorClient, push: str = "http", device: str = "cpu", config=None):
        self.client = client
        self.push_mode, self.device, self.config = push, device, config
        self.transport: WeightTransport | None = None
        self.target: PushTarget | None = None  # what the server accepts (its last GET /weights)

    def wait_until_ready(self, timeout: float) -> None:
        self.client.wait_until_ready(timeout=timeout)

    def weights_spec(self) -> tuple[int, dict[str, tuple[list[int], str]]]:
        spec = self.target = self.client.weights_spec()
        if self.transport is None:
            name = choose_transport(self.push_mode, spec, self.device)
            self.transport = make_transport(name, self.client, self.config, spec)
        return spec.weights_version, {k: (t.shape, t.dtype) for k, t in spec.tensors.items()}

    def version(self) -> int:
        return self.client.health().weights_version

    def generate(self, prompts, n, max_tokens, temperature, seed, top_p=1.0, stop=None, logprobs=False):
        out = self.client.generate(
            prompts=list(prompts), n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop=stop, seed=seed, logprobs=logprobs,
        )  # fmt: skip
        return GenerationBatch(
            weights_version=out.weights_version,
            prompts=list(prompts),
            prompt_token_ids=[r.prompt_token_ids for r in out.results],
            completions=[r.completions for r in out.results],
            server_timing=out.timing.model_dump() if out.timing is not None else None,
        )

    def _transport(self) -> WeightTransport:
        if self.transport is None:
            self.weights_spec()
        return self.transport

    @property
    def max_pending(self) -> int:
        return self._transport().max_pending

    def snapshot(self, tensors, dtypes):
        return self._transport().snapshot(tensors, dtypes)

    def push(self, snapshot, version: int) -> dict:
        transport = self._transport()
        try:
            return transport.push(snapshot, version)
        except (StreamUnreachable, GeneratorHTTPError) as e:
            refused = isinstance(e, GeneratorHTTPError) and e.status_code == 400
            if not (self.push_mode == "auto" and transport.name in ("ipc", "stream")):
                raise
            if not (refused or isinstance(e, StreamUnreachable)):
                raise
            # `auto` chose a fast path the server or this host cannot take after all: CUDA IPC handles that
            # cannot be opened (containers without a shared IPC namespace), a stream port that cannot be
            # reached (not published, a firewall) or that a restarted server no longer has. The failed
            # transfer left the server serving a whole version; this push sends a whole one by PUT /weights,
            # and so does every push after it.
            log.warning("%s push failed (%s); push: auto falls back to http", transport.name, e)
            self.transport = make_transport("http", self.client, self.config, self.target)
            if transport.name == "stream":
                return self.transport.push(snapshot, version)  # the same snapshot: a host copy with BLAKE3
            from trainer_client.transports.ipc import bucket_tensors

            tensors = bucket_tensors(snapshot)
            dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()}
            return self.transport.push(self.transport.snapshot(tensors, dtypes), version)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.client.close()


def make_backend(config: TrainConfig) -> GenerationBackend:
    if config.mode == "server":
        # One server is waited for while it restarts; among replicas, one that is away is dropped instead
        # (the others take its prompts, and it is probed and taken back when it answers): waiting on it
        # would hold up every batch.
        one = len(config.server_urls) == 1
        servers = []
        for url in config.server_urls:
            client = GeneratorClient(
                url, api_key=config.api_key, timeout=config.request_timeout, max_retries=config.max_retries,
                restart_timeout=config.server_restart_timeout if one else 0.0,
            )  # fmt: skip
            servers.append(ServerBackend(client, push=config.push, device=config.device, config=config))
        if len(servers) == 1:
            return servers[0]
        from trainer_client.replicas import ReplicaSetBackend

        return ReplicaSetBackend(servers)
    if config.mode == "colocate":
        from trainer_client.colocate import ColocatedBackend  # imports vLLM: only in this mode

        return ColocatedBackend.from_config(config)
    raise NotImplementedError(f"mode {config.mode!r} is not implemented")


__all__ = ["GenerationBatch", "GenerationBackend", "ServerBackend", "make_backend", "GeneratorUnavailable"]
