"""Checkpoints: a Hugging Face model folder plus the trainer state needed to resume.

``output_dir/checkpoint-000010/`` holds ``config.json``, ``model.safetensors`` and the tokenizer (loadable as
is by transformers and by vLLM, so a generation server can be started from it) and ``trainer_state.pt``
(optimizer, scheduler, RNG states, step, the number of ranks that wrote it, and anything else the trainer
wants back). A run on several ranks writes the same folder, except that AdamW's state, sharded over the
ranks, is in ``optimizer/`` (torch.distributed.checkpoint, one file per rank) instead of
``trainer_state.pt``; it resumes on as many ranks as wrote it. A LoRA run (``lora_rank > 0``) writes peft's
adapter folder in place of the model's weights (``adapter_model.safetensors`` in fp32, ``adapter_config.json``
naming the base; ``save_checkpoint`` gets the ``PeftModel``, whose ``save_pretrained`` writes it), loadable
by ``PeftModel.from_pretrained`` and merged into a model folder by ``trainer-client merge-lora``.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"
"""Several ranks: the folder of the sharded optimizer state (torch.distributed.checkpoint)."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path, model, tokenizer, optimizer, scheduler, step: int, extra: dict[str, Any] | None = None
) -> Path:
    """Write the checkpoint to ``path`` atomically (a temporary folder renamed at the end)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
        "world_size": 1,
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def save_sharded_checkpoint(
    path: str | Path,
    model,
    tokenizer,
    weights: Mapping[str, torch.Tensor],
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    save_optimizer: Callable[[Path], None],
    scheduler,
    step: int,
    extra: dict[str, Any],
    world_size: int,
) -> Path:
    """Rank 0's part of a checkpoint of a sharded policy, written atomically as :func:`save_checkpoint`:
    the model's config and tokenizer, ``model.safetensors`` streamed from ``weights`` (full tensors read in
    the file's order, so only what ``weights`` holds at a time is in memory) with the names and shapes of
    ``specs``, the optimizer by ``save_optimizer(folder)`` (which every rank joins), then the rest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_safetensors(tmp / "model.safetensors", weights, specs)
    save_optimizer(tmp / OPTIMIZER_DIR)
    state = {
        "step": step,
        "optimizer": None,  # in OPTIMIZER_DIR, one shard per rank
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
        "world_size": world_size,
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


SAFETENSORS_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
) -> None:
    """A safetensors file of ``specs`` (name -> dtype, shape; the header is written first, from them)
    whose data is read from ``tensors`` one name at a time, in name order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape)}
        header[name]["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(specs):
            t = tensors[name].detach().to("cpu").contiguous()
            if (t.dtype, tuple(t.shape)) != (specs[name][0], tuple(specs[name][1])):
                raise ValueError(f"{name}: {t.dtype} {list(t.shape)} is not the announced {specs[name]}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def read_trainer_state(path: str | Path, world_size: int) -> dict[str, Any]:
    """The trainer state of checkpoint folder ``path``, refused unless it was written by ``world_size``
    ranks (AdamW's state is sharded as they were)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a trainer checkpoint (no {STATE_FILE})")
    state = torch.load(file, map_location="cpu", weights_only=False)
    saved = state.get("world_size", 1)
    if saved != world_size:
        how = (
            "in one process (without torchrun)"
            if saved == 1
            else f"on {saved} ranks (torchrun: --nnodes x --nproc-per-node = {saved})"
        )
        raise ValueError(
            f"checkpoint {path} was written by {saved} rank(s) and this run has {world_size}: resume it {how}"
        )
    return state


def restore_trainer_state(state: dict[str, Any], optimizer, scheduler) -> None:
    """Put back the scheduler, the RNG and (if given: one process) the optimizer of ``state``."""
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def load_trainer_state(path: str | Path, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint folder written by one process; returns the
    saved state dict (``step``, ``extra``). The model weights are loaded by ``from_pretrained(path)``."""
    state = read_trainer_state(path, world_size=1)
    restore_trainer_state(state, optimizer, scheduler)
    return state
