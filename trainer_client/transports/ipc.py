"""``push: ipc``: trainer and server on the same GPU, weights handed over by CUDA IPC.

The snapshot packs the policy's tensors, cast to the served dtype, into flat GPU buffers ("buckets") of at
most ``bucket_bytes`` each (a larger tensor gets a bucket of its own). The push then opens a transfer
session on the server, sends each bucket's CUDA IPC handle as JSON (never a pickle), and commits: the
server's worker maps the buffer, copies the tensors into vLLM's parameters and lets go of it, so no byte
crosses the host or the disk. The server checks the names, shapes and dtypes of the whole version before it
pauses generation, and serves the new version only once every tensor has arrived (see
``generator_server/ipc.py``). A failed push aborts the session, which leaves the previous version serving.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from online_dpo_protocol import host_id
from trainer_client.client import GeneratorClient, GeneratorError, StaleVersionError
from trainer_client.transports.base import TransportError, refuse_adapter, served_dtype

ALIGN = 256
"""Byte alignment of each tensor inside a bucket (any dtype's view is aligned; kernels stay vectorised)."""


def local_gpu(device: str) -> tuple[str, str] | None:
    """``(host id, GPU UUID)`` of a CUDA ``device`` of this process, or None for a CPU device."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return host_id(), str(torch.cuda.get_device_properties(index).uuid)


@dataclass
class Bucket:
    buffer: torch.Tensor  # (nbytes,) uint8 on the GPU
    tensors: list[dict] = field(default_factory=list)  # name, shape, dtype, offset (bytes)


def bucket_tensors(buckets: list[Bucket]) -> dict[str, torch.Tensor]:
    """The tensors packed into ``buckets``, as views of them (name -> tensor in the served dtype)."""
    out = {}
    for bucket in buckets:
        for t in bucket.tensors:
            dtype = getattr(torch, t["dtype"])
            nbytes = math.prod(t["shape"]) * dtype.itemsize
            out[t["name"]] = bucket.buffer[t["offset"] : t["offset"] + nbytes].view(dtype).view(t["shape"])
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ipc_handle(buffer: torch.Tensor) -> dict:
    """The JSON form of the CUDA IPC handle of a flat uint8 GPU buffer (what ``reduce_tensor`` computes)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    (_, size, stride, tensor_offset, _, dtype, _, handle, storage_bytes, storage_offset, _,
     ref_handle, ref_offset, event_handle, event_sync) = args  # fmt: skip
    if dtype != torch.uint8 or list(size) != [buffer.numel()] or list(stride) != [1]:
        raise TransportError("an IPC bucket must be a flat uint8 buffer")
    return {
        "storage_handle": _b64(handle),
        "storage_size_bytes": int(storage_bytes),
        "storage_offset_bytes": int(storage_offset),
        "tensor_offset": int(tensor_offset),
        "nbytes": int(buffer.numel()),
        "ref_counter_handle": _b64(ref_handle),
        "ref_counter_offset": int(ref_offset),
        "event_handle": _b64(event_handle) if event_handle else None,
        "event_sync_required": bool(event_sync),
    }


def pack_buckets(
    tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str], bucket_bytes: int
) -> list[Bucket]:
    """Copy ``tensors`` (cast to the served dtypes) into flat GPU buffers of at most ``bucket_bytes``.

    Each tensor is read once, in the order of ``dtypes`` (a sharded learner gathers on reading): a bucket's
    tensors are held until it is full, then copied into a buffer of exactly their size."""
    buckets: list[Bucket] = []
    pending: list[tuple[str, torch.Tensor, torch.dtype, int]] = []  # name, tensor, served dtype, offset
    size = 0

    def close() -> None:
        bucket = Bucket(torch.empty(size, dtype=torch.uint8, device=pending[0][1].device))
        for name, t, dtype, offset in pending:
            view = bucket.buffer[offset : offset + t.numel() * dtype.itemsize].view(dtype).view(t.shape)
            view.copy_(t)  # cast and copy in one kernel
            bucket.tensors.append(
                {"name": name, "shape": list(t.shape), "dtype": str(dtype).removeprefix("torch."),
                 "offset": offset}
            )  # fmt: skip
        buckets.append(bucket)
        pending.clear()

    for name, served in dtypes.items():
        t = tensors[name].detach()
        dtype = served_dtype(t, served)
        nbytes = t.numel() * dtype.itemsize
        if pending and size + nbytes > bucket_bytes:
            close()
            size = 0
        pending.append((name, t, dtype, size))
        size += -(-nbytes // ALIGN) * ALIGN
    if pending:
        close()
    return buckets


class IpcTransport:
    name = "ipc"
    max_pending = 1  # each snapshot is a copy of the model in GPU memory

    def __init__(self, client: GeneratorClient, bucket_bytes: int = 2**30):
        self.client = client
        self.bucket_bytes = bucket_bytes

    def snapshot(
        self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str], adapter: dict | None = None
    ) -> list[Bucket]:
        refuse_adapter(self.name, adapter)
        if not all(tensors[n].is_cuda for n in dtypes):
            raise TransportError("push: ipc needs the policy on a CUDA device")
        buckets = pack_buckets(tensors, dtypes, self.bucket_bytes)
        torch.cuda.current_stream().synchronize()  # the server reads the buffers from another process
        return buckets

    def push(self, snapshot: list[Bucket], version: int) -> dict:
        device = snapshot[0].buffer.device
        where = local_gpu(str(device))
        manifest = [{k: t[k] for k in ("name", "shape", "dtype")} for b in snapshot for t in b.tensors]
        try:
            session = self.client.ipc_begin(version, where[0], where[1], manifest)
        except StaleVersionError:
            if self.client.health().weights_version == version:  # a retried begin that had committed
                return {"weights_version": version}
            raise
        try:
            for bucket in snapshot:
                self.client.ipc_bucket(session, ipc_handle(bucket.buffer), bucket.tensors)
            out = self.client.ipc_commit(session).model_dump()
        except BaseException:
            try:
                self.client.ipc_abort(session)
            except GeneratorError:
                pass  # the server aborts the session itself when it hears nothing
            raise
        finally:
            torch.cuda.ipc_collect()  # free buffers the server has let go of
        return out

    def close(self) -> None:
        pass
