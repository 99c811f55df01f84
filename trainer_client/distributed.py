"""Several ranks under torchrun: the process group, FSDP2 sharding, rank 0's commands to the other ranks and
full tensors gathered on demand. Only the learner (learner.py) uses this module.

``torchrun --nproc-per-node N -m trainer_client train ...`` starts N processes (ranks) with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. Rank 0 runs the training loop (train.py: producer, rewards, pushes,
metrics, checkpoints); the other ranks run no loop of their own: they follow rank 0's learner. Before each
operation that needs every rank, rank 0's learner sends a command over the control channel (a gloo group,
``broadcast_object_list``), then every rank runs that operation's collectives:

    ("step", rows)      the step's pairs as token ids; rank r trains on rows[r::world]
    ("finite", None)    which tensors hold NaN or Inf, checked on each rank's shards and all-reduced
    ("gather", names)   the full tensors of a bucket of the policy's tensors (``DTensor.full_tensor``, in
                        order) for a push or a checkpoint written by rank 0; the other ranks drop theirs
    ("save", folder)    the sharded AdamW state, written with torch.distributed.checkpoint
    ("stop", error)     the end: None, or why rank 0 stopped (the other ranks exit with that message)

So the order of the collectives is decided in one place (rank 0's calls), and a failure of rank 0 between
two commands reaches the others as a "stop" that says why. Every collective has a timeout
(``dist_timeout_seconds``): a rank that dies breaks the others' next collective at once (gloo sees its
connection close), one that hangs ends it at the timeout; either way they raise
:class:`DistributedError`, which names their own rank and what they were doing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


class DistributedError(RuntimeError):
    """This rank lost the others (one died, failed or hung past ``dist_timeout_seconds``), or rank 0 stopped
    the run; the message names this rank and what it was doing."""


def world_size() -> int:
    """Ranks of this run: ``WORLD_SIZE`` as torchrun sets it, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Ranks:
    """This process's place among the ranks, and the channels between them."""

    rank: int
    world_size: int
    device: str  # this rank's device: cpu, or cuda:LOCAL_RANK
    timeout: float  # seconds any collective may wait
    control: Any  # a gloo process group: commands and small all-reduces, on the CPU whatever the device
    mesh: Any  # FSDP2's one-dimensional DeviceMesh over all ranks

    @classmethod
    def start(cls, device: str, timeout: float) -> Ranks:
        """Join the process group that torchrun's environment describes (``env://``)."""
        from torch.distributed.device_mesh import init_device_mesh

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            device, backend = f"cuda:{local_rank}", "nccl"
        elif device == "cpu":
            backend = "gloo"
        else:
            raise ValueError(
                f"device: {device} cannot be shared by several ranks; use cuda (each rank takes "
                "cuda:LOCAL_RANK) or cpu"
            )
        limit = timedelta(seconds=timeout)
        if not dist.is_initialized():  # (a second learner in one process shares the group)
            dist.init_process_group(backend, timeout=limit)
        control = dist.new_group(backend="gloo", timeout=limit)  # (apart from FSDP's, even on the CPU)
        mesh = init_device_mesh(torch.device(device).type, (world,))
        return cls(rank, world, device, timeout, control, mesh)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- the control channel ---------------------------------------------------------------------------
    def send(self, command: str, arg: Any = None) -> None:
        """Rank 0: tell the other ranks what to do next (they wait for it in ``receive``)."""
        with self.watch(f"sending {command!r} to the other ranks"):
            dist.broadcast_object_list([command, arg], src=0, group=self.control)

    def receive(self) -> tuple[str, Any]:
        """The other ranks: rank 0's next command."""
        box = [None, None]
        with self.watch("waiting for rank 0's next command"):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0], box[1]

    def all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        """``values`` combined over all ranks (float64, on the control channel)."""
        t = torch.tensor(values, dtype=torch.float64)
        with self.watch("combining the ranks' statistics"):
            dist.all_reduce(t, op=op, group=self.control)
        return t.tolist()

    @contextmanager
    def watch(self, doing: str) -> Iterator[None]:
        """Turn a failed collective into a :class:`DistributedError` that says who and what."""
        try:
            yield
        except RuntimeError as e:
            if not is_communication_error(e):
                raise
            reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())  # (gloo: "[file.cc:553] ...")
            reason = reason.splitlines()[0].split(". ")[0] if reason else type(e).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world_size} lost the other ranks while {doing} ({reason}); "
                f"another rank stopped, crashed or hung for more than dist_timeout_seconds "
                f"({self.timeout:g} s): its own output says why"
            ) from e

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def is_communication_error(e: BaseException) -> bool:
    """A collective that failed because a peer went away or timed out: torch's DistError, or a plain
    RuntimeError from gloo or NCCL (never one of our own RuntimeError subclasses)."""
    if isinstance(e, dist.DistError):
        return True
    markers = ("gloo", "NCCL", "Timed out", "timed out", "Connection", "ProcessGroup")
    return type(e) is RuntimeError and any(s in str(e) for s in markers)


# --------------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------------
def shard(root: nn.Module, layers: list[nn.Module], mesh, param_dtype: torch.dtype | None = None) -> None:
    """``fully_shard`` each of ``layers`` (the decoder layers), then ``root`` (the rest: embeddings, final
    norm, lm_head). Each rank keeps 1/world of every parameter (dim 0); a layer's full parameters exist
    only around its own forward and backward. ``param_dtype`` (bf16) is the compute dtype: the sharded
    parameters (the master weights AdamW updates) keep their dtype and gradients are reduced in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    reduce_dtype = torch.float32 if param_dtype is not None else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Sum the ranks' gradients, not their mean: each rank's loss is already divided by the step's
            # pair count over all ranks, so the sum is the one-rank gradient. Plain SUM: gloo has no
            # PREMUL_SUM.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank's shard (a collective all ranks must join, in the same
    order) for a sharded parameter, the tensor itself for a replicated one (a buffer)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (the tensor itself when not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def buckets(tensors: Mapping[str, torch.Tensor], names: Iterable[str], bucket_bytes: int) -> list[list[str]]:
    """``names`` in their order, cut into runs of at most ``bucket_bytes`` of full tensors (a larger tensor
    is a bucket of its own)."""
    out: list[list[str]] = [[]]
    size = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()  # a DTensor's numel is the full tensor's
        if out[-1] and size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(name)
        size += nbytes
    return out


class FullTensors(Mapping):
    """Rank 0's view of a sharded state dict as full tensors: reading a name gathers its whole bucket
    (``fetch(names)``, which every rank joins) and keeps that bucket, and only that one, until a name of
    another bucket is read. So a push or a checkpoint holds one bucket of full tensors at a time, never the
    whole model; a reader that takes the names in the buckets' order gathers each bucket once."""

    gathers_on_read = True
    """Readers that can choose their order take the names in iteration order (the buckets' order)."""

    def __init__(self, buckets: list[list[str]], fetch: Callable[[list[str]], dict[str, torch.Tensor]]):
        self.buckets, self.fetch = buckets, fetch
        self.where = {name: b for b, names in enumerate(buckets) for name in names}
        self.bucket: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        b = self.where[name]
        if b != self.bucket:
            self.bucket, self.tensors = None, {}  # let the previous bucket go before gathering the next
            self.tensors, self.bucket = self.fetch(self.buckets[b]), b
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:  # (Mapping's own would read, so gather, the tensor)
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


# --------------------------------------------------------------------------------------------------------
# Sharded optimizer state (torch.distributed.checkpoint: one folder, one file per rank)
# --------------------------------------------------------------------------------------------------------
def save_optimizer(model: nn.Module, optimizer, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)


def load_optimizer(model: nn.Module, optimizer, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # (AdamW's state, created empty)
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
