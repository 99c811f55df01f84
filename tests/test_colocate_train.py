"""The trainer in colocated mode (``mode: colocate``): the same loop, metrics, checkpoints and resume, with
the vLLM CPU engine inside the trainer process and the weights handed over in memory after every step.

Like tests/test_trainer_e2e.py, it trains the tiny model on a JSONL of prompts with the ``length`` reward
(every prompt's K samples differ in length, so every step has pairs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import max_logprob_diff_to_trainer, read_metrics, without_timings

import trainer_client.train as train_module
from trainer_client.config import TrainConfig
from trainer_client.train import run_training

STEPS = 4


@pytest.fixture(scope="module")
def base_config(tiny_model_dir, length_task) -> dict:
    return dict(
        mode="colocate",
        model=str(tiny_model_dir),
        task=str(length_task),
        reward="length",
        steps=STEPS,
        batch_size=4,
        samples_per_prompt=4,
        max_new_tokens=24,
        learning_rate=1e-3,
        beta=0.1,
        progress_bar=False,
        seed=0,
        colocate_kv_cache_gib=1,
    )


@pytest.fixture(scope="module")
def colocated_run(base_config, tmp_path_factory):
    """One asynchronous run (max_staleness 1); its engine is kept open afterwards for inspection."""
    backends = []

    def keep_open(config):
        backend = make_backend(config)
        backends.append(backend)
        backend.close = lambda: None  # closed by this fixture instead
        return backend

    make_backend = train_module.make_backend
    out_dir = tmp_path_factory.mktemp("colocated")
    config = TrainConfig(**base_config, max_staleness=1, output_dir=str(out_dir))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "make_backend", keep_open)
        summary = run_training(config)
    (backend,) = backends
    yield summary, read_metrics(out_dir), backend
    backend.engine.close()


def test_colocated_run_completes(colocated_run):
    summary, records, backend = colocated_run
    assert type(backend).__name__ == "ColocatedBackend"
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert 0 <= r["staleness"] <= 1
        assert r["batch_weights_version"] == r["step"] - 1 - r["staleness"]
        assert r["pairs"] > 0 and r["loss"] > 0 and r["push_seconds"] >= 0
    assert summary["version_offset"] == 0
    assert backend.version() == STEPS  # one in-memory handover per step
    assert Path(summary["final_checkpoint"], "model.safetensors").is_file()


def test_engine_serves_the_trained_weights(colocated_run, tiny_model_dir):
    """The engine's log-probabilities of its own samples equal the trainer's under the final checkpoint."""
    summary, _, backend = colocated_run
    batch = backend.generate(
        ["Count to 3:", "Count to 11:"], n=2, max_tokens=12, temperature=1.0, seed=7, logprobs=True
    )
    assert batch.weights_version == STEPS
    rows = zip(batch.prompt_token_ids, batch.completions, strict=True)
    samples = [(prompt_ids, c) for prompt_ids, row in rows for c in row]
    assert max_logprob_diff_to_trainer(summary["final_checkpoint"], samples) < 1e-3
    assert max_logprob_diff_to_trainer(tiny_model_dir, samples) > 1e-2  # and not the initial weights


def test_resume_through_the_cli_gives_the_same_metrics(base_config, tmp_path):
    """A synchronous colocated run, then the same run resumed from its step-2 checkpoint with
    ``trainer-client train --colocate --resume``: the metrics file ends up the same, timings aside."""
    config = {k: v for k, v in base_config.items() if k != "mode"}
    config.update(max_staleness=0, checkpoint_every=2, output_dir=str(tmp_path / "run"))
    run_training(TrainConfig(**config, mode="colocate"))
    uninterrupted = read_metrics(tmp_path / "run")
    assert [r["staleness"] for r in uninterrupted] == [0] * STEPS

    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))  # mode: server in the file; --colocate switches it
    checkpoint = tmp_path / "run" / "checkpoint-000002"
    command = ["train", "--colocate", "--config", str(config_path), "--resume", str(checkpoint)]
    proc = subprocess.run([sys.executable, "-m", "trainer_client", *command], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert without_timings(resumed) == without_timings(uninterrupted)
