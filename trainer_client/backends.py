"""Generation backends: ``make_backend`` picks the one the trainer's config asks for.

The protocol every backend follows and the batch it answers with are in ``trainer_client/generation.py``,
which imports none of them. ``mode: server`` is :class:`~trainer_client.server_backend.ServerBackend` over
one server, or ``ReplicaSetBackend`` (``trainer_client/replicas.py``) over several; ``mode: colocate`` is
``ColocatedBackend`` (``trainer_client/colocate.py``), with vLLM inside the trainer process.
"""

from __future__ import annotations

from trainer_client.client import GeneratorClient, GeneratorUnavailable
from trainer_client.config import TrainConfig
from trainer_client.generation import GenerationBackend, GenerationBatch, IncompatibleServerError
from trainer_client.replicas import ReplicaSetBackend
from trainer_client.server_backend import ServerBackend


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
        return servers[0] if len(servers) == 1 else ReplicaSetBackend(servers)
    if config.mode == "colocate":
        from trainer_client.colocate import ColocatedBackend  # imports vLLM: only in this mode

        return ColocatedBackend.from_config(config)
    raise NotImplementedError(f"mode {config.mode!r} is not implemented")


__all__ = [
    "GenerationBatch", "GenerationBackend", "IncompatibleServerError", "ServerBackend", "make_backend",
    "GeneratorUnavailable",
]  # fmt: skip
