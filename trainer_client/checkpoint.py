"""Checkpoints: a Hugging Face model folder plus the trainer state needed to resume.

``output_dir/checkpoint-000010/`` holds ``config.json``, ``model.safetensors`` and the tokenizer (loadable as
is by transformers and by vLLM, so a generation server can be started from it) and ``trainer_state.pt``
(optimizer, scheduler, RNG states, step, and anything else the trainer wants back).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_trainer_state(path: str | Path, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint folder; returns the saved state dict
    (``step``, ``extra``). The model weights are loaded by ``from_pretrained(path)``."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a trainer checkpoint (no {STATE_FILE})")
    state = torch.load(file, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
