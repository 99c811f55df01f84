"""What every weight transport provides, and the copies they take of the policy."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from online_dpo_protocol.models import ADAPTER_METADATA_KEY


class TransportError(RuntimeError):
    """A transport cannot be used as configured (the message says why and what to pick instead)."""


class WeightTransport(Protocol):
    name: str
    max_pending: int
    """Snapshots that may wait for the pusher: each one is a copy of the model (host or device memory)."""

    def snapshot(
        self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str], adapter: dict | None = None
    ) -> Any:
        """Copy ``tensors`` (name -> live tensor) as the server serves them (``dtypes``: name -> torch dtype
        name, e.g. ``bfloat16``); called in the training thread, so it must be quick. ``adapter``: the
        tensors are a LoRA adapter's and this is its adapter_config.json (``http`` and ``stream`` only)."""
        ...

    def push(self, snapshot: Any, version: int) -> dict:
        """Make ``snapshot`` the served weights, reported as ``version`` from then on."""
        ...

    def close(self) -> None: ...


def adapter_metadata(adapter: dict | None) -> dict[str, str] | None:
    """The safetensors metadata of an adapter push (its config as JSON), or None for whole weights."""
    if adapter is None:
        return None
    return {ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True)}


def refuse_adapter(name: str, adapter: dict | None) -> None:
    """Raise :class:`TransportError` for an adapter snapshot on a transport ``name`` that carries whole
    models only."""
    if adapter is not None:
        raise TransportError(
            f"push: {name} carries whole models only; push a LoRA adapter by http or stream, or set "
            "lora_sync: merged"
        )


def served_dtype(tensor: torch.Tensor, served: str) -> torch.dtype:
    """The dtype a tensor travels in: floating tensors in the served floating dtype, others as they are
    (and dtypes torch does not know, too)."""
    dtype = getattr(torch, served, None)
    if tensor.is_floating_point() and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return tensor.dtype


def host_snapshot(tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """CPU copies in the served dtypes (half the bytes of fp32 for a bf16 server; the server casts nothing).

    From a GPU the copies go to pinned memory, cast on the device first, so the copy runs at the bus's
    speed; a CPU tensor is cast (or copied) in place of memory."""
    out, from_gpu = {}, False
    for name, served in dtypes.items():  # each tensor read once (a sharded learner gathers on reading)
        t = tensors[name].detach()
        dtype = served_dtype(t, served)
        if t.is_cuda:
            cast = t.to(dtype)
            host = torch.empty(cast.shape, dtype=dtype, pin_memory=True)
            host.copy_(cast, non_blocking=True)
            out[name], from_gpu = host, True
        else:
            out[name] = t.to("cpu", dtype=dtype, copy=True)
    if from_gpu:
        torch.cuda.synchronize()  # the non-blocking copies have landed before anyone reads them
    return out
