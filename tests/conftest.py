"""Shared fixtures: a tiny model built from nothing and one real generation server per test session.

``tiny_model_dir`` and ``server`` are meant for reuse (trainer tests too); see ``server_process.py`` for
``running_server``. Tests that change the served weights push a version above the current one and never
assume which weights an earlier test left behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from server_process import ServerHandle, running_server

# Engines the tests build in this process (colocated mode) take vLLM's CPU KV cache from this variable (GiB);
# the default would reserve several. Set here so that `python -m pytest -q` works as the README prints it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

API_KEY = "test-key"
TRANSFER_TIMEOUT = 5.0
"""The shared server aborts a CUDA IPC transfer that hears nothing for this long (GPU tests wait for it)."""
MAX_UPLOAD_BYTES = 4 * 2**20
"""Upload limit of the shared server; the tiny model's fp32 weights are about 1.8 MB."""

ON_GPU = torch.cuda.is_available()
"""The same test files run against the CUDA engine (``docs/BENCHMARKS.md``). vLLM's CUDA kernels are not
bit-reproducible the way its CPU ones are: a repeated prompt is read from the prefix cache through another
kernel path, and vLLM's worker runs float32 matmuls in TF32. So exact equality becomes a tolerance there."""
REPEAT_LOGPROB_TOLERANCE = 0.05 if ON_GPU else 0.0
"""Same weights, same request, asked twice: CPU answers are identical to the last bit. On the H100, 1e-3
was too tight for a prompt read back from the prefix cache (TF32); other weights differ by far more."""
REFERENCE_LOGPROB_TOLERANCE = 0.25 if ON_GPU else 1e-3
"""vLLM against transformers (fp32, eager) on the same weights; TF32 on the GPU measured up to 0.12 on
the tests' random-weight models, whose logits are large."""


PROBE = {"prompts": ["The cat sat", "Hello world, this is"], "max_tokens": 12, "temperature": 0.0}


def probe(client) -> dict:
    """A greedy answer with log-probabilities (``client``: an httpx.Client of the server): the same answer
    (``same_outputs``) means the same weights."""
    response = client.post("/generate", json={**PROBE, "logprobs": True, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def same_weights(a: dict, b: dict) -> bool:
    """The same answer but for the version: the same weights served."""
    return same_outputs(a, {**b, "weights_version": a["weights_version"]})


def same_outputs(a: dict, b: dict) -> bool:
    """Two /generate answers carry the same version, tokens and log-probabilities: what a client can see of
    "the same weights served". On the CPU to the last bit. On the GPU up to ``REPEAT_LOGPROB_TOLERANCE``,
    and a greedy near-tie may flip a token when the prompt is read from the prefix cache, so there the
    completions must agree up to that flip, which must not be their first token."""
    if a["weights_version"] != b["weights_version"] or len(a["results"]) != len(b["results"]):
        return False
    for ra, rb in zip(a["results"], b["results"], strict=True):
        if ra["prompt_token_ids"] != rb["prompt_token_ids"]:
            return False
        for ca, cb in zip(ra["completions"], rb["completions"], strict=True):
            if (ca["logprobs"] is None) != (cb["logprobs"] is None):
                return False
            exact = ca["token_ids"] == cb["token_ids"] and ca["finish_reason"] == cb["finish_reason"]
            if not ON_GPU and not exact:
                return False
            same = common_prefix(ca["token_ids"], cb["token_ids"])
            if same == 0 and (ca["token_ids"] or cb["token_ids"]):
                return False
            if ca["logprobs"] is not None:
                pairs = zip(ca["logprobs"][:same], cb["logprobs"][:same], strict=True)
                if any(abs(x - y) > REPEAT_LOGPROB_TOLERANCE for x, y in pairs):
                    return False
    return True


def common_prefix(x: list[int], y: list[int]) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def answer_distance(a: dict, b: dict) -> float:
    """How far apart two answers to the same request are: per completion, every token after the first
    one that differs counts 1, and on the common prefix the log-probability differences add up. On the GPU
    a batch of other requests changes the rounding, and a near-tie can flip a greedy token."""
    total = 0.0
    for ra, rb in zip(a["results"], b["results"], strict=True):
        for ca, cb in zip(ra["completions"], rb["completions"], strict=True):
            same = common_prefix(ca["token_ids"], cb["token_ids"])
            total += max(len(ca["token_ids"]), len(cb["token_ids"])) - same
            prefix = zip(ca["logprobs"][:same], cb["logprobs"][:same], strict=True)
            total += sum(abs(x - y) for x, y in prefix)
    return total


def max_logprob_diff_to_trainer(model_dir, samples) -> float:
    """Largest |served - trainer| log-probability over ``samples``, ``(prompt_token_ids, completion)`` pairs
    whose completions carry ``token_ids`` and ``logprobs``; the trainer's side is ``token_logps`` of the
    model folder ``model_dir`` in fp32, as the training loop computes it."""
    from transformers import AutoModelForCausalLM

    from trainer_client.dpo import collate, token_logps

    prompts = [p for p, _ in samples]
    completions = [c.token_ids for _, c in samples]
    input_ids, attention_mask, _ = collate(prompts, completions, pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = token_logps(model, input_ids, attention_mask)  # (B, T)
    return max(
        (ours[i, len(p) : len(p) + len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max().item()
        for i, (p, c) in enumerate(samples)
    )


def text_matches_tokens(text: str, decoded: str) -> bool:
    """``text`` is ``decoded`` (``tokenizer.decode(token_ids)``), except that vLLM's detokenizer holds back an
    incomplete UTF-8 sequence at the very end (byte-level BPE can stop mid-character), which ``decode``
    writes as U+FFFD: the tail that may be missing is U+FFFD only."""
    return decoded.startswith(text) and set(decoded[len(text) :]) <= {"\ufffd"}


def read_metrics(output_dir: Path) -> list[dict]:
    """A training run's ``metrics.jsonl``, one dict per step."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    """Metrics records without their ``*_seconds`` keys (timings differ between identical runs)."""
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


@pytest.fixture(scope="session")
def length_task(tmp_path_factory) -> Path:
    """40 counting prompts as a JSONL task: with the ``length`` reward every prompt's samples differ, so
    every step has pairs."""
    path = tmp_path_factory.mktemp("task") / "count.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Count to {i}:"}) + "\n" for i in range(40)))
    return path


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

    Context 256 tokens, uploads up to ``MAX_UPLOAD_BYTES``, ``/weights/load`` below ``checkpoint_root``, a
    stream port (so a trainer's ``push: auto`` sends its weights there)."""
    with running_server(
        tiny_model_dir,
        "--api-key", API_KEY,
        "--checkpoint-root", str(checkpoint_root),
        "--work-dir", str(server_work_dir),
        "--max-upload-bytes", str(MAX_UPLOAD_BYTES),
        "--max-model-len", "256",
        "--transfer-timeout", str(TRANSFER_TIMEOUT),
        "--stream-port", "0",
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


@pytest.fixture(scope="module")
def batch():
    """The learner tests' batch (test_learner, test_lora): 3 prompts x K=3 samples of random tokens (ragged
    lengths: padding in every micro-batch); 3 pairs."""
    from online_dpo_protocol import Completion
    from trainer_client.generation import GenerationBatch

    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 512, (n,), generator=generator).tolist()

    prompts = [tokens(n) for n in (5, 9, 3)]
    completions = [
        [Completion(text="", token_ids=tokens(n), logprobs=None, finish_reason="stop") for n in lengths]
        for lengths in ((7, 12, 4), (10, 3, 8), (6, 6, 11))
    ]
    samples = GenerationBatch(0, ["a", "b", "c"], prompts, completions)
    return samples, [(0, 1, 2), (1, 0, 1), (2, 2, 0)]
