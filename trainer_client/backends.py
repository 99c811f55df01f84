"""Generation backends: the one seam between the training loop and whatever produces samples.

The loop only calls the methods of :class:`GenerationBackend`. ``mode: server`` implements them with the
HTTP :class:`~trainer_client.client.GeneratorClient`; a ``colocate`` backend (vLLM inside the trainer
process, weights handed over in memory) can implement the same methods and be returned by
``make_backend``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from trainer_client.client import (
    Completion,
    GeneratorClient,
    GeneratorUnavailable,
    StaleVersionError,
)
from trainer_client.config import TrainConfig


@dataclass
class GenerationBatch:
    """``n`` completions for each prompt, all sampled from the weights of ``weights_version``."""

    weights_version: int
    """The backend's version of the weights that sampled this batch."""
    prompts: list[str]
    prompt_token_ids: list[list[int]]  # (B, prompt_len_i)
    completions: list[list[Completion]]  # (B, n): token_ids, text, finish_reason, logprobs


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

    def push(self, state_dict: Mapping[str, Any], version: int) -> dict:
        """Make ``state_dict`` the served weights, reported as ``version`` from then on."""
        ...

    def close(self) -> None: ...


class ServerBackend:
    """Generation over HTTP by a running generation server (the whole batch in one request; with a seed,
    the server samples prompt ``i`` with ``seed + i``). Weights go up in ``PUT /weights``, or, with a
    ``shared_dir``, as a file there that the server loads with ``POST /weights/load``."""

    def __init__(
        self, client: GeneratorClient, shared_dir: str | None = None, shared_dir_on_server: str | None = None
    ):
        self.client = client
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.shared_dir_on_server = shared_dir_on_server or (shared_dir and str(Path(shared_dir).resolve()))

    def wait_until_ready(self, timeout: float) -> None:
        self.client.wait_until_ready(timeout=timeout)

    def weights_spec(self) -> tuple[int, dict[str, tuple[list[int], str]]]:
        spec = self.client.weights_spec()
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
        )

    def push(self, state_dict, version):
        try:
            if self.shared_dir is None:
                return self.client.push_weights(state_dict, version).model_dump()
            return self._push_shared(state_dict, version)
        except StaleVersionError:
            # A retried PUT whose first attempt did land answers 409; that is success.
            if self.version() == version:
                return {"weights_version": version}
            raise

    def _push_shared(self, state_dict, version: int) -> dict:
        """Write the weights into the shared folder, have the server load them, remove older files."""
        from safetensors.torch import save_file

        self.shared_dir.mkdir(parents=True, exist_ok=True)
        name = f"weights-v{version:08d}.safetensors"
        tmp = self.shared_dir / f".{name}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp)
        tmp.rename(self.shared_dir / name)  # the server never sees a half-written file
        out = self.client.load_weights(f"{self.shared_dir_on_server}/{name}", version).model_dump()
        for old in self.shared_dir.glob("weights-v*.safetensors"):
            if old.name < name:
                old.unlink(missing_ok=True)
        return out

    def close(self) -> None:
        self.client.close()


def make_backend(config: TrainConfig) -> GenerationBackend:
    if config.mode == "server":
        client = GeneratorClient(
            config.server_url, api_key=config.api_key, timeout=config.request_timeout,
            max_retries=config.max_retries,
        )  # fmt: skip
        if config.push == "shared":
            return ServerBackend(client, config.shared_dir, config.shared_dir_on_server)
        return ServerBackend(client)
    if config.mode == "colocate":
        from trainer_client.colocate import ColocatedBackend  # imports vLLM: only in this mode

        return ColocatedBackend.from_config(config)
    raise NotImplementedError(f"mode {config.mode!r} is not implemented")


__all__ = ["GenerationBatch", "GenerationBackend", "ServerBackend", "make_backend", "GeneratorUnavailable"]
