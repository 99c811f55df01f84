"""Unit tests of the trainer's config, tasks and built-in rewards (no server, no torch models)."""

import json
import subprocess
import sys

import pytest

from trainer_client.config import ConfigError, TrainConfig, load_config
from trainer_client.rewards import build_reward
from trainer_client.tasks import TASKS, JsonlTask, Task, load_task, register_task


def test_defaults_and_typed_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: models/tiny\nsteps: 5\nloss: ipo\n")
    c = load_config(path, ["beta=0.5", 'stop=["\\n", "."]', "max_grad_norm=null", "max_staleness=0"])
    assert (c.model, c.steps, c.loss, c.beta, c.max_grad_norm, c.max_staleness) == (
        "models/tiny",
        5,
        "ipo",
        0.5,
        None,
        0,
    )
    assert c.stop == ["\n", "."]
    assert c.mode == "server" and c.samples_per_prompt >= 2


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["stepz=3"], "stepz"),
        (["steps=three"], "steps"),
        (["samples_per_prompt=1"], "samples_per_prompt"),
        (["loss=hinge"], "loss"),
        (["mode=remote"], "mode"),
        (["server_url=localhost:8000"], "server_url"),
        (["temperature=0"], "temperature"),
    ],
)
def test_bad_keys_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["model=m", *overrides])


def test_unknown_key_in_file_and_missing_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="model"):
        load_config(None, [])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_every_field_is_documented():
    for name, field in TrainConfig.model_fields.items():
        assert field.description, f"{name} has no docstring"


def test_cli_bad_config_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_client", "train", "--set", "model=m", "--set", "beta=-1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: bad config: beta: Input should be greater than 0"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_task_split_determinism_and_reward(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(20)]
    task = load_task(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert isinstance(task, Task) and task.name == "t"
    held_out = task.eval_prompts()
    assert held_out == ["q18", "q19"]  # the last tenth
    a = [task.train_prompts(s, 5, seed=1) for s in range(8)]
    assert a == [task.train_prompts(s, 5, seed=1) for s in range(8)]  # a pure function of (seed, step)
    assert a != [task.train_prompts(s, 5, seed=2) for s in range(8)]
    seen = {p for batch in a for p in batch}
    assert not seen & set(held_out) and len(seen) == 18  # 40 draws cover the 18 training prompts
    assert task.reward("q3", " 3\nmore") == 1.0 and task.reward("q3", "33") == 0.0


def test_jsonl_explicit_eval_split_and_errors(tmp_path):
    task = JsonlTask(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a"}, {"prompt": "b", "split": "eval"}]))
    assert task.train_prompts(0, 3, 0) == ["a", "a", "a"] and task.eval_prompts() == ["b"]
    with pytest.raises(ValueError, match="answer"):
        build_reward("task", task)  # no answers: no programmatic reward
    assert build_reward("length", task)(["a"], ["x" * 50]) == [0.5]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_task(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown task"):
        load_task("no-such-task")
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward("no-such-reward", task)


def test_registry_is_extensible():
    class Echo:
        name, stop, max_new_tokens = "echo", None, 4

        def train_prompts(self, step, n, seed):
            return [f"{seed}:{step}"] * n

        def eval_prompts(self):
            return ["e"]

        def reward(self, prompt, completion):
            return float(prompt in completion)

    register_task("echo", Echo)
    try:
        task = load_task("echo")
        assert build_reward("task", task)(["a", "b"], ["xa", "x"]) == [1.0, 0.0]
    finally:
        del TASKS["echo"]
    assert "arithmetic" in TASKS


def test_shared_push_needs_a_folder():
    with pytest.raises(ConfigError, match="shared_dir"):
        load_config(None, ["model=m", "push=shared"])
    assert load_config(None, ["model=m", "push=shared", "shared_dir=/ckpt/pushed"]).push == "shared"


def test_api_key_comes_from_the_environment_and_is_never_written(monkeypatch):
    monkeypatch.setenv("GENERATOR_API_KEY", "s3cret-from-env")
    config = TrainConfig(model="m")
    assert config.api_key == "s3cret-from-env"
    assert TrainConfig(model="m", api_key="given").api_key == "given"  # an explicit key wins
    # checkpoints and summaries store model_dump(); logs show repr()
    assert "api_key" not in config.model_dump() and "s3cret" not in json.dumps(config.model_dump())
    assert "s3cret" not in repr(config)
    monkeypatch.delenv("GENERATOR_API_KEY")
    assert TrainConfig(model="m").api_key is None
