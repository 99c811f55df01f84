"""Shared fixtures: a tiny model built from nothing and one real generation server per test session.

``tiny_model_dir`` and ``server`` are meant for reuse (trainer tests too); see ``server_process.py`` for
``running_server``. Tests that change the served weights push a version above the current one and never
assume which weights an earlier test left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from server_process import ServerHandle, running_server

API_KEY = "test-key"
MAX_UPLOAD_BYTES = 4 * 2**20
"""Upload limit of the shared server; the tiny model's fp32 weights are about 1.8 MB."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (vocab 512, hidden 128, 2 layers, fp32 safetensors) with its BPE tokenizer."""
    from generator_server.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    """The shared server's --checkpoint-root: POST /weights/load reads only below it."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def server_work_dir(tmp_path_factory) -> Path:
    """The shared server's --work-dir (staged uploads, served weights), so tests can see it is tidy."""
    return tmp_path_factory.mktemp("server-work")


@pytest.fixture(scope="session")
def server(tiny_model_dir, checkpoint_root, server_work_dir) -> Iterator[ServerHandle]:
    """One real server (real vLLM CPU engine) on the tiny model, with an API key, for the whole session.

    Context 256 tokens, uploads up to ``MAX_UPLOAD_BYTES``, ``/weights/load`` below ``checkpoint_root``."""
    with running_server(
        tiny_model_dir,
        "--api-key", API_KEY,
        "--checkpoint-root", str(checkpoint_root),
        "--work-dir", str(server_work_dir),
        "--max-upload-bytes", str(MAX_UPLOAD_BYTES),
        "--max-model-len", "256",
    ) as handle:  # fmt: skip
        print(f"\ngeneration server healthy after {handle.start_seconds:.1f} s (log: {handle.log_path})")
        yield handle


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    """An HTTP client of the shared server that sends the API key."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def make_weights(tiny_model_dir, tmp_path_factory) -> Callable[..., Path]:
    """``make_weights(seed, scale=0.5, dtype="float32", edit=None) -> path`` of a new safetensors file.

    The tiny model's tensors plus ``scale`` times seeded Gaussian noise: a sharper model than the nearly
    uniform initial one, so greedy decoding has clear winners. ``edit(state_dict)`` may change the tensors
    (drop, add, reshape) before the file is written."""
    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(tiny_model_dir / "model.safetensors")
    out_dir = tmp_path_factory.mktemp("weights")
    count = 0

    def make(seed: int, scale: float = 0.5, dtype: str = "float32", edit=None) -> Path:
        nonlocal count
        generator = torch.Generator().manual_seed(seed)
        tensors = {
            name: (t + scale * torch.randn(t.shape, generator=generator)).to(getattr(torch, dtype))
            for name, t in base.items()
        }
        if edit is not None:
            edit(tensors)
        count += 1
        path = out_dir / f"weights-{count}-seed{seed}.safetensors"
        save_file(tensors, path)
        return path

    return make
