"""The trainer end to end against the real generation server (real vLLM CPU engine, real HTTP).

Uses the session's shared ``server`` (tests/conftest.py) on the tiny model. Its samples are noise, so the
task is a JSONL of prompts with the built-in ``length`` reward (characters / 100): every prompt's K
samples differ in length, so every step has pairs. The server's history is unknown to these tests (other
modules push weights too); the trainer copes with that by pushing its policy first (version offset), and
the assertions use policy versions plus the offset the run reports.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import max_logprob_diff_to_trainer, read_metrics, without_timings
from server_process import free_port, running_server

from trainer_client.backends import ServerBackend
from trainer_client.client import GeneratorClient
from trainer_client.config import TrainConfig
from trainer_client.train import run_training

STEPS = 5
SWITCH_INTERVALS: list[float] = []  # sys.getswitchinterval() at each push of async_run
REQUIRED_KEYS = {
    "step", "batch_weights_version", "staleness", "reward_mean", "reward_chosen", "reward_rejected", "loss",
    "kl", "gen_seconds", "score_seconds", "reference_seconds", "train_seconds", "push_seconds",
    "wall_seconds",
}  # fmt: skip


@pytest.fixture(scope="module")
def base_config(server, tiny_model_dir, length_task) -> dict:
    return dict(
        model=str(tiny_model_dir),
        server_url=server.url,
        api_key=server.api_key,
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
        precision="fp32",  # exact: step 1's KL is 0 (a bf16 reference is not bit-equal to the policy)
    )


@pytest.fixture(scope="module")
def async_run(base_config, tmp_path_factory):
    """One run with max_staleness 1; records every PUT /weights the trainer made (a spy on the real push),
    and the thread switch interval each was made under."""
    pushed: list[int] = []
    real_push = ServerBackend.push

    def spy(self, state_dict, version):
        out = real_push(self, state_dict, version)
        pushed.append(version)
        SWITCH_INTERVALS.append(sys.getswitchinterval())
        return out

    out_dir = tmp_path_factory.mktemp("async")
    config = TrainConfig(**base_config, max_staleness=1, output_dir=str(out_dir))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ServerBackend, "push", spy)
        summary = run_training(config)
    return summary, read_metrics(out_dir), pushed


def test_run_completes_and_logs_every_step(async_run):
    summary, records, _ = async_run
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert REQUIRED_KEYS <= r.keys()
        assert r["pairs"] + r["skipped_ties"] == 4
        assert r["pairs"] > 0 and r["loss"] > 0 and r["reward_chosen"] > r["reward_rejected"]
        # the server's share of the request's time: its engine, plus any wait behind a push
        assert 0 < r["gen_server_seconds"] + r["gen_weights_wait_seconds"] <= r["gen_seconds"]
        assert r["reference_seconds"] > 0  # reference_ahead: the producer took the reference's log-probs
        assert 0 < r["train_cpu_seconds"] <= r["train_seconds"] + 0.01  # (one thread's CPU time)
    # step 1 trains the reference itself: the log-probabilities taken ahead are the policy's own
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert Path(summary["final_checkpoint"], "model.safetensors").is_file()


def test_thread_switch_interval_set_for_the_run_only(async_run):
    """``gil_switch_ms`` (default 0.5) holds while the run's threads work, and Python's own comes back."""
    assert SWITCH_INTERVALS and all(abs(i - 0.0005) < 1e-9 for i in SWITCH_INTERVALS)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_server_version_advances_every_step(async_run, server):
    summary, records, pushed = async_run
    offset = summary["version_offset"]
    # an initial push of the untrained policy only when the server did not start at version 0
    steps_pushed = pushed[1:] if offset else pushed
    assert steps_pushed == [step + offset for step in range(1, STEPS + 1)]
    assert server.weights_version() == summary["server_version"] == STEPS + offset


def test_staleness_bounded_and_generation_overlapped(async_run):
    _, records, _ = async_run
    assert all(0 <= r["staleness"] <= 1 for r in records)
    assert all(r["batch_weights_version"] == r["step"] - 1 - r["staleness"] for r in records)
    # the producer generated batch s while the trainer trained step s-1: at least half of what could have
    # been hidden (the shorter of the two) was hidden in some step
    hideable = [
        min(r["gen_seconds"], prev["score_seconds"] + prev["train_seconds"])
        for prev, r in zip(records, records[1:], strict=False)
    ]
    assert any(r["overlap_seconds"] >= 0.5 * h > 0 for r, h in zip(records[1:], hideable, strict=True)), (
        records
    )


def test_pushed_weights_are_the_trained_ones(async_run, server, tiny_model_dir):
    """Logprobs the server reports for its samples equal the trainer's own under the final checkpoint."""
    summary, _, _ = async_run
    with GeneratorClient(server.url, api_key=server.api_key) as client:
        assert client.health().weights_version == summary["server_version"]
        out = client.generate(
            prompts=["Count to 3:", "Count to 11:"], n=2, max_tokens=12, seed=7, logprobs=True
        )
    samples = [(result.prompt_token_ids, c) for result in out.results for c in result.completions]
    assert max_logprob_diff_to_trainer(summary["final_checkpoint"], samples) < 1e-3
    assert max_logprob_diff_to_trainer(tiny_model_dir, samples) > 1e-2  # and not the initial weights


@pytest.fixture(scope="module")
def sync_run(base_config, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sync")
    config = dict(base_config, max_staleness=0, steps=4, checkpoint_every=2, output_dir=str(out_dir))
    run_training(TrainConfig(**config))
    return config, read_metrics(out_dir)


def test_synchronous_run_is_on_policy(sync_run):
    _, records = sync_run
    assert [r["staleness"] for r in records] == [0, 0, 0, 0]
    assert all(r["overlap_seconds"] == 0 for r in records)


def test_resume_gives_the_same_metrics(sync_run, tmp_path):
    """Resume from the step-2 checkpoint (through the CLI, into the same output_dir): the metrics file ends
    up as the uninterrupted run wrote it, timings aside."""
    config, uninterrupted = sync_run
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    checkpoint = Path(config["output_dir"]) / "checkpoint-000002"
    command = ["train", "--config", str(config_path), "--resume", str(checkpoint)]
    proc = subprocess.run([sys.executable, "-m", "trainer_client", *command], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_metrics(Path(config["output_dir"]))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert without_timings(resumed) == without_timings(uninterrupted)


def test_push_through_a_shared_folder(base_config, server, checkpoint_root, tmp_path):
    """push: shared writes each version below the server's --checkpoint-root and has it POST /weights/load."""
    shared = checkpoint_root / "pushed"
    config = dict(base_config, steps=2, max_staleness=0, push="shared", shared_dir=str(shared))
    summary = run_training(TrainConfig(**config, output_dir=str(tmp_path)))
    assert server.weights_version() == summary["server_version"]
    assert [p.name for p in shared.iterdir()] == [f"weights-v{summary['server_version']:08d}.safetensors"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


class SwitchableProxy:
    """A small HTTP forwarder in front of a generation server, so that one address can start answering from
    another server, as a restarted server would. ``restart_after_put(V, url)``: once a ``PUT /weights`` of
    version V has succeeded, forward everything to ``url`` from then on, and answer the next
    ``unavailable`` requests with 503 first (a server that is still starting)."""

    def __init__(self, target: str):
        self.target, self.switch, self.unavailable = target, None, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if proxy.unavailable > 0:
                    proxy.unavailable -= 1
                    status, content, kind = 503, b'{"detail": "the engine is starting"}', "application/json"
                else:
                    skip = {"host", "content-length", "connection", "transfer-encoding"}
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                    r = httpx.request(
                        self.command, proxy.target + self.path, content=body, headers=headers, timeout=300
                    )
                    status, content, kind = (
                        r.status_code,
                        r.content,
                        r.headers.get("content-type", "text/plain"),
                    )
                    if self.command == "PUT" and status == 200 and proxy.switch:
                        version, url = proxy.switch
                        if f"version={version}" in self.path:
                            proxy.target, proxy.switch, proxy.unavailable = url, None, 2
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = forward

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def restart_after_put(self, version: int, url: str) -> None:
        self.switch = (version, url)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow  # starts a second server
def test_server_restart_mid_run(sync_run, server, tiny_model_dir, tmp_path, caplog):
    """The server goes away after the push of step 2 and comes back fresh (version 0, initial weights): the
    trainer retries, notices the version went back, pushes its weights again and carries on, and the run
    writes the same metrics as the uninterrupted one."""
    config, uninterrupted = sync_run
    v0 = server.weights_version()
    offset = 0 if v0 == 0 else v0 + 1  # what the trainer will choose (see trainer_client/train.py)
    proxy = SwitchableProxy(server.url)
    try:
        with running_server(tiny_model_dir, "--api-key", server.api_key) as fresh:
            proxy.restart_after_put(2 + offset, fresh.url)
            run_config = dict(config, server_url=proxy.url, output_dir=str(tmp_path), checkpoint_every=0)
            run_config["push"] = "http"  # through the proxy (the server's stream port would go around it)
            with caplog.at_level(logging.WARNING, logger="trainer_client"):
                summary = run_training(TrainConfig(**run_config))
            assert fresh.weights_version() == summary["server_version"] == 4 + offset
    finally:
        proxy.close()
    assert proxy.switch is None  # the restart did happen
    assert any("server restarted" in r.getMessage() for r in caplog.records)
    assert without_timings(read_metrics(tmp_path)) == without_timings(uninterrupted)


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "trainer_client", "train"]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def one_layer_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model with its second layer removed: same tokenizer, different architecture."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, out / "model.safetensors")
    return out


def test_wrong_server_model_is_a_clear_error(server, tiny_model_dir, length_task, tmp_path):
    other = one_layer_copy(tiny_model_dir, tmp_path / "one-layer")
    proc = run_cli(
        f"model={other}", f"server_url={server.url}", f"api_key={server.api_key}", f"task={length_task}",
        "reward=length", f"output_dir={tmp_path / 'out'}", "progress_bar=false",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: wrong server model:") and "missing in the policy: model.layers.1." in last


def test_unreachable_server_is_a_clear_error(tiny_model_dir, length_task, tmp_path):
    proc = run_cli(
        f"model={tiny_model_dir}", f"server_url=http://127.0.0.1:{free_port()}", f"task={length_task}",
        "reward=length", "connect_timeout=1", f"output_dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: generation server:") and "ConnectError" in lines[0]


def test_wrong_api_key_is_a_clear_error(server, tiny_model_dir, length_task, tmp_path):
    proc = run_cli(
        f"model={tiny_model_dir}", f"server_url={server.url}", "api_key=wrong", f"task={length_task}",
        "reward=length", f"output_dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "401" in proc.stderr.strip().splitlines()[-1]


def test_non_finite_weights_are_never_pushed(server, tiny_model_dir, length_task, tmp_path):
    """A policy holding NaN (a broken folder, or a step that blew up) stops the trainer with a clear error
    before its weights reach the server, which keeps serving what it served."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, broken / "model.safetensors")
    version = server.weights_version()
    proc = run_cli(
        f"model={broken}", f"ref_model={tiny_model_dir}", f"server_url={server.url}",
        f"api_key={server.api_key}", f"task={length_task}", "reward=length", f"output_dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: not finite:") and "model.norm.weight" in last, last
    assert server.weights_version() == version


def test_held_out_evaluation_during_the_run(base_config, server, tmp_path):
    """``eval_every``: the held-out reward before step 1, every N steps and after the last, each of the
    version just trained and as ``trainer-client eval`` would score it; the steps' times exclude it."""
    from trainer_client.tasks import load_task

    config = TrainConfig(**{**base_config, "steps": 3}, eval_every=2, output_dir=str(tmp_path))
    summary = run_training(config)
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    steps = read_metrics(tmp_path)
    assert [e["step"] for e in evals] == [0, 2, 3]
    offset = summary["version_offset"]
    assert [e["eval_weights_versions"] for e in evals] == [[0 + offset], [2 + offset], [3 + offset]]
    # the training time so far is the steps' own time, evaluations excluded
    assert [e["train_seconds"] for e in evals] == pytest.approx(
        [0.0, sum(r["wall_seconds"] for r in steps[:2]), sum(r["wall_seconds"] for r in steps)], abs=2e-3
    )
    # the last evaluation is what the served final version scores on the held-out prompts, greedily
    task = load_task(str(base_config["task"]))
    with GeneratorClient(server.url, api_key=server.api_key) as client:
        assert client.health().weights_version == 3 + offset
        out = client.generate(
            prompts=task.eval_prompts(), n=1, temperature=0.0, max_tokens=base_config["max_new_tokens"]
        )
    lengths = [len(r.completions[0].text) / 100 for r in out.results]
    assert evals[-1]["eval_reward"] == pytest.approx(sum(lengths) / len(lengths))
    assert evals[-1]["eval_prompts"] == len(task.eval_prompts()) > 0


def test_two_steps_on_a_reasoning_gym_task(base_config, server, tiny_model_dir, tmp_path):
    """A reasoning-gym task end to end: chat prompts rendered with the policy's template, the dataset's
    verifier as the reward (plus a little of `length`, so that the tiny model's noise gives pairs), two
    steps trained and pushed, and the held-out set scored by the verifier before and after."""
    from chat_model import with_chat_template

    model = with_chat_template(tiny_model_dir, tmp_path / "chat-model")
    config = TrainConfig(
        **base_config
        | dict(
            model=str(model),
            steps=2,
            batch_size=2,
            task="reasoning-gym:chain_sum",
            task_options={"min_terms": 2, "max_terms": 2, "max_digits": 1},
            task_eval_size=4,
            reward=["task", "length"],
            reward_weights=[1.0, 0.01],
            eval_every=2,
            output_dir=str(tmp_path / "run"),
        )
    )
    summary = run_training(config)
    steps = read_metrics(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2] and all(r["pairs"] > 0 for r in steps)
    with GeneratorClient(server.url, api_key=server.api_key) as client:
        assert client.health().weights_version == 2 + summary["version_offset"]
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval_prompts"] == 4 for e in evals)
