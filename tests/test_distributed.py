"""Training on several ranks (torchrun, FSDP2 on the CPU over gloo), against one process doing the same.

1. The learner alone, no server: one ``torchrun --nproc-per-node 2 tests/dist_worker.py`` runs a set of DPO
   steps; each must give the statistics and gradients of the same step in one process (this one): an even
   and an odd pair count, micro-batches that leave a rank without pairs, a step with one pair (rank 1 has
   none), one without pairs, gradient checkpointing with chunked log-probabilities, and a checkpoint
   written on 2 ranks then resumed on 2 ranks.
2. End to end against the session's server: ``torchrun --nproc-per-node 2 -m trainer_client train`` for 3
   synchronous steps and a one-process run of the same config write the same metrics (within
   ``*_TOLERANCE``), the server serves one version per step, and the final checkpoint loads in transformers
   and in the server.
3. Bad launches end with a clear message and no hang: ``--resume`` with another number of ranks, a rank that
   is killed, a rank that hangs (every collective times out after ``dist_timeout_seconds``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import max_logprob_diff_to_trainer, read_metrics, without_timings
from dist_worker import STATS, run_case
from server_process import free_port

from trainer_client.client import GeneratorClient
from trainer_client.config import TrainConfig
from trainer_client.learner import Learner
from trainer_client.train import run_training

TESTS = Path(__file__).parent
GRAD_TOLERANCE = 1e-6
"""|gradient 2 ranks - gradient 1 rank|, per entry: the same sums in another order (measured 4.5e-8)."""
STATS_TOLERANCE = 1e-5
"""Relative difference of loss, KL and gradient norm, 2 ranks vs 1 (measured 1e-6 at most)."""
MARGIN_TOLERANCE = 1e-4
"""Absolute difference of the margin h, a difference of summed log-probabilities (tens each, so fp32 sums in
another order move it by 1e-5; measured 1.2e-5)."""
WEIGHT_TOLERANCE = 1e-4
"""|weights 2 ranks - weights 1 rank| after AdamW steps at learning rate 1e-3. AdamW's first step moves a
weight by lr * g / (|g| + 1e-8), which turns a rounding difference of a near-zero gradient entry into a
visible one (up to lr/1e-8 times it); measured 5e-6 after one step of the learner cases, 2.3e-7 after
the three end-to-end steps."""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def noisy_copy(model_dir: Path, out: Path, seed: int) -> str:
    """The tiny model plus seeded noise (as tests/test_learner.py: a clear policy/reference gap)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(out / "model.safetensors")
    save_file({n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in tensors.items()},
              out / "model.safetensors")  # fmt: skip
    return str(out)


# ----------------------------------------------------------------------------------------------------------
# 1. The learner's step on 2 ranks equals the step on 1
# ----------------------------------------------------------------------------------------------------------
CASES = [
    {"pairs": 4},
    {"pairs": 3},  # 2 + 1
    {"pairs": 3, "config": {"micro_batch_size": 1}},  # rank 1's second micro-batch has no pair
    {"pairs": 1},  # rank 1 has no pair at all
    {"pairs": 0},  # all ties: no forward, no backward anywhere
    {
        "pairs": 5,
        "config": {"micro_batch_size": 2, "gradient_checkpointing": True, "logprob_chunk_tokens": 5},
    },
    {"pairs": 3, "resume": True, "config": {"max_grad_norm": 1.0, "weight_decay": 0.01}},
]


@pytest.fixture(scope="module")
def sharded_steps(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-learner")
    models = {"policy": noisy_copy(tiny_model_dir, root / "policy", 1),
              "reference": noisy_copy(tiny_model_dir, root / "reference", 2)}  # fmt: skip
    spec = root / "spec.json"
    spec.write_text(json.dumps({"models": models, "cases": CASES, "scratch": str(root / "scratch")}))
    started = time.monotonic()
    proc = subprocess.run(
        [*TORCHRUN, str(TESTS / "dist_worker.py"), str(spec), str(root / "out.pt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"\n2-rank learner cases: {time.monotonic() - started:.1f} s")
    return models, torch.load(root / "out.pt", weights_only=False)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[json.dumps(c) for c in CASES])
def test_sharded_step_equals_the_one_process_step(sharded_steps, index):
    models, results = sharded_steps
    case, two = CASES[index], results[index]
    one = run_case(models, case)
    for key in STATS:
        if one["stats"][key] is None:
            assert two["stats"][key] is None, key
        else:
            tolerance = dict(abs=MARGIN_TOLERANCE) if key == "logratio_margin" else dict(rel=STATS_TOLERANCE)
            assert two["stats"][key] == pytest.approx(one["stats"][key], **tolerance), key
    assert one["grads"].keys() == two["grads"].keys()
    assert bool(one["grads"]) == bool(case["pairs"])  # no pairs: no gradient at all
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=0, atol=GRAD_TOLERANCE, msg=name)
    assert one["weights"].keys() == two["weights"].keys()
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=0, atol=WEIGHT_TOLERANCE, msg=name)
    if case.get("resume"):  # the second step after a resume on 2 ranks is the uninterrupted second step
        uninterrupted, resumed = two["second"]
        assert resumed == uninterrupted
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(two["checkpoint"], dtype=torch.float32).state_dict()
        assert saved.keys() == two["weights"].keys()
        assert all(torch.equal(saved[n], t) for n, t in two["weights"].items())


def test_sharded_checkpoint_writes_the_file_save_pretrained_writes(tiny_model_dir, tmp_path):
    """The streamed safetensors writer of sharded checkpoints, fed full tensors: byte for byte the file of
    ``save_pretrained`` (fp32 model)."""
    from transformers import AutoModelForCausalLM

    from trainer_client.checkpoint import write_safetensors

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf")
    state = model.state_dict()
    write_safetensors(
        tmp_path / "ours.safetensors", state, {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}
    )
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "hf" / "model.safetensors"
    ).read_bytes()


def test_several_ranks_refuse_colocate_and_a_fixed_gpu(tiny_model_dir, monkeypatch):
    """Before any process group is joined (nothing to wait for): every rank refuses the same way."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="mode: colocate runs in one process"):
        Learner(TrainConfig(model=str(tiny_model_dir), mode="colocate"))
    with pytest.raises(ValueError, match="device: cuda:1 cannot be shared by several ranks"):
        Learner(TrainConfig(model=str(tiny_model_dir), device="cuda:1"))


# ----------------------------------------------------------------------------------------------------------
# 2. End to end: torchrun on 2 ranks against the server, next to one process
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_config(server, tiny_model_dir, length_task) -> dict:
    return dict(
        model=str(tiny_model_dir), server_url=server.url, api_key=server.api_key, task=str(length_task),
        reward="length", steps=3, batch_size=3, samples_per_prompt=4, max_new_tokens=24, learning_rate=1e-3,
        beta=0.1, max_staleness=0, micro_batch_size=1, progress_bar=False, seed=0, precision="fp32",
    )  # fmt: skip


def config_file(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def two_runs(run_config, server, checkpoint_root, tmp_path_factory):
    """The same 3 steps in one process, then on 2 ranks (in checkpoint_root: the server may load them);
    right after the 2-rank run, what the server serves."""
    one_dir, two_dir = checkpoint_root / "dist-one", checkpoint_root / "dist-two"
    started = time.monotonic()
    one = run_training(TrainConfig(**run_config, output_dir=str(one_dir)))
    one_seconds = time.monotonic() - started
    config = config_file(
        dict(run_config, output_dir=str(two_dir)), tmp_path_factory.mktemp("dist") / "c.yaml"
    )
    started = time.monotonic()
    proc = subprocess.run([*TORCHRUN, "-m", "trainer_client", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    two_seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"\n1 process: {one_seconds:.1f} s, 2 ranks (torchrun, with start-up): {two_seconds:.1f} s")
    with GeneratorClient(server.url, api_key=server.api_key) as client:
        served_version = client.health().weights_version
        served = client.generate(
            prompts=["Count to 3:", "Count to 11:"], n=2, max_tokens=12, seed=7, logprobs=True
        )
    final = two_dir / "checkpoint-000003"
    state = torch.load(final / "trainer_state.pt", weights_only=False)
    return one, two_dir, proc, served_version, served, state


def test_two_ranks_write_the_metrics_of_one(two_runs):
    one, two_dir, proc, *_ = two_runs
    a, b = read_metrics(Path(one["output_dir"])), read_metrics(two_dir)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert any(r["pairs"] % 2 for r in b), "want a step whose pairs do not split evenly over 2 ranks"
    close = ("loss", "kl", "logratio_margin", "grad_norm")
    for ra, rb in zip(without_timings(a), without_timings(b), strict=True):
        for key in close:
            tolerance = dict(abs=MARGIN_TOLERANCE) if key == "logratio_margin" else dict(rel=STATS_TOLERANCE)
            assert rb[key] == pytest.approx(ra[key], **tolerance), (key, ra, rb)
        assert {k: v for k, v in rb.items() if k not in close} == {
            k: v for k, v in ra.items() if k not in close
        }
    assert proc.stdout.count("done: 3 steps") == 1  # only rank 0 reports


def test_one_push_per_step_and_a_checkpoint_of_2_ranks(two_runs):
    _, _, _, served_version, _, state = two_runs
    # the run's metrics lines are written once their version is served, so steps 1..3 each pushed one
    assert served_version == 3 + state["extra"]["version_offset"]
    assert state["world_size"] == 2 and state["step"] == 3 and state["optimizer"] is None


def test_final_checkpoint_loads_in_transformers_and_in_the_server(two_runs, server, checkpoint_root):
    from transformers import AutoModelForCausalLM

    one, two_dir, _, served_version, served, _ = two_runs
    final = two_dir / "checkpoint-000003"
    # the last push carried the trained weights: the server's log-probabilities are transformers' on them
    samples = [(result.prompt_token_ids, c) for result in served.results for c in result.completions]
    assert served.weights_version == served_version
    assert max_logprob_diff_to_trainer(final, samples) < 1e-3
    ours = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(one["final_checkpoint"], dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=WEIGHT_TOLERANCE, msg=name)
    with GeneratorClient(server.url, api_key=server.api_key) as client:
        version = client.health().weights_version + 1
        assert (
            client.load_weights(str(final.relative_to(checkpoint_root)), version).weights_version == version
        )
        out = client.generate(prompts=["Count to 5:"], n=2, max_tokens=12, seed=3, logprobs=True)
    assert (
        max_logprob_diff_to_trainer(
            final, [(out.results[0].prompt_token_ids, c) for c in out.results[0].completions]
        )
        < 1e-3
    )


# ----------------------------------------------------------------------------------------------------------
# 3. Bad launches
# ----------------------------------------------------------------------------------------------------------
def test_resume_with_another_number_of_ranks_fails_fast(two_runs, run_config, tmp_path):
    one, two_dir, *_ = two_runs
    config = config_file(dict(run_config, steps=5, output_dir=str(tmp_path / "out")), tmp_path / "c.yaml")
    started = time.monotonic()
    command = ["-m", "trainer_client", "train", "--config", str(config), "--resume", one["final_checkpoint"]]
    proc = subprocess.run([*TORCHRUN, *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    message = "was written by 1 rank(s) and this run has 2: resume it in one process (without torchrun)"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # each rank says it, and exits
    print(f"\n--resume on 2 ranks of a 1-process checkpoint: refused in {time.monotonic() - started:.1f} s")
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\) and this run has 1: resume it on 2 ranks"):
        Learner(TrainConfig(**dict(run_config, steps=5)), resume=str(two_dir / "checkpoint-000003"))


@pytest.mark.parametrize(
    "victim, how, expected",
    [
        (0, signal.SIGKILL, "rank 1 of 2 lost the other ranks while"),  # waiting, or inside a step
        (1, signal.SIGSTOP, "rank 0 of 2 lost the other ranks while"),
    ],
    ids=["rank-0-killed", "rank-1-hangs"],
)
def test_a_rank_that_dies_or_hangs_ends_the_other_with_a_clear_message(
    run_config, tmp_path, victim, how, expected
):
    """Two ranks launched by hand (no torchrun to tear the group down): once step 2 is logged, one rank is
    killed, or stopped (a hang); the other exits with status 1 and one clear line, at once for a dead peer
    and within ``dist_timeout_seconds`` for a hung one."""
    timeout = 10
    config = config_file(
        dict(run_config, steps=50, output_dir=str(tmp_path / "out"), dist_timeout_seconds=timeout),
        tmp_path / "c.yaml",
    )
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        command = [sys.executable, "-m", "trainer_client", "train", "--config", str(config)]
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no step 2"
            time.sleep(0.2)
        procs[victim].send_signal(how)
        hit = time.monotonic()
        survivor = procs[1 - victim]
        _, stderr = survivor.communicate(timeout=timeout + 30)
        seconds = time.monotonic() - hit
    finally:
        for p in procs:
            p.kill()
            p.wait()
    last = stderr.strip().splitlines()[-1]
    assert survivor.returncode == 1, stderr[-3000:]
    assert last.startswith("error: distributed: " + expected), last
    assert seconds < timeout + 15, seconds
    print(f"\n{how.name} of rank {victim}: rank {1 - victim} exited after {seconds:.1f} s: {last[:160]}")
