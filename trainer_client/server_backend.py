"""``mode: server`` with one server: generation by ``POST /generate`` of the HTTP
:class:`~trainer_client.client.GeneratorClient`, pushes by a weight transport (trainer_client/transports)."""

from __future__ import annotations

import logging

from trainer_client.client import GeneratorClient, GeneratorHTTPError, PushTarget
from trainer_client.generation import GenerationBatch
from trainer_client.transports import WeightTransport, choose_transport, make_transport
from trainer_client.transports.stream import StreamUnreachable

log = logging.getLogger(__name__)


def pushes_adapters(config) -> bool:
    """Whether a trainer config's pushes are LoRA adapters (``lora_rank > 0``, ``lora_sync: adapter``)."""
    return config is not None and config.lora_rank > 0 and config.lora_sync == "adapter"


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
            name = choose_transport(self.push_mode, spec, self.device, adapter=pushes_adapters(self.config))
            self.transport = make_transport(name, self.client, self.config, spec)
        return spec.weights_version, {k: (t.shape, t.dtype) for k, t in spec.tensors.items()}

    def version(self) -> int:
        return self.client.health().weights_version

    def max_lora_rank(self) -> int | None:
        if self.target is None:
            self.weights_spec()
        return self.target.max_lora_rank

    def base_version(self) -> int:
        if self.target is None:
            self.weights_spec()
        return self.target.base_version

    def generate(self, prompts, n, max_tokens, temperature, seed, top_p=1.0, stop=None, logprobs=False):
        out = self.client.generate(
            prompts=list(prompts), n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop=stop, seed=seed, logprobs=logprobs,
        )  # fmt: skip
        return GenerationBatch.answered(prompts, out)

    def _transport(self) -> WeightTransport:
        if self.transport is None:
            self.weights_spec()
        return self.transport

    @property
    def max_pending(self) -> int:
        return self._transport().max_pending

    def snapshot(self, tensors, dtypes, adapter=None):
        return self._transport().snapshot(tensors, dtypes, adapter)

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
