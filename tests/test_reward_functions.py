"""Rewards by import path (``reward: package.module:function``), weighted lists of rewards, and one short
run end to end: a chat-format JSONL task scored by a reward function of this module, against the session's
real generation server, with TensorBoard beside metrics.jsonl."""

from __future__ import annotations

import json
import math
import socket
import threading

import pytest
from chat_model import with_chat_template
from conftest import read_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoTokenizer

from trainer_client.config import ConfigError, TrainConfig, load_config
from trainer_client.metrics_log import TENSORBOARD_DIR, scalars
from trainer_client.rewards import RewardFunctionError, build_reward, runs_in_any_thread
from trainer_client.tasks import JsonlTask, load_task
from trainer_client.train import run_training

CALLS: list[dict] = []
"""What ``contains_answer`` was called with, in order."""


def contains_answer(prompts, completions, answer, **row_fields):
    """1.0 where the completion contains the row's answer (a user's reward function with a named column)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    CALLS.append({"prompts": prompts, "completions": completions, "answer": answer, **row_fields,
                  "in_main_thread": in_main_thread})  # fmt: skip
    return [float(str(a) in c) for a, c in zip(answer, completions, strict=True)]


def first_char_code(prompts, completions):
    """Takes no row fields: gets none."""
    return [ord(c[0]) if c else 0 for c in completions]


def broken(prompts, completions, **_):
    raise KeyError("score")


def one_short(prompts, completions, **_):
    return [0.0] * (len(completions) - 1)


def not_a_number(prompts, completions, **_):
    return [math.nan] * len(completions)


@pytest.fixture
def answers_task(tmp_path):
    rows = [
        {"prompt": "1+1=", "answer": "2", "source": "a"},
        {"prompt": "2+2=", "answer": "4", "source": "b"},
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JsonlTask(tmp_path / "t.jsonl")


def test_a_function_gets_the_rows_columns_by_name(answers_task):
    CALLS.clear()
    reward = build_reward(f"{__name__}:contains_answer", answers_task)
    assert reward(["1+1=", "2+2=", "1+1="], ["2", "5", "x2"]) == [1.0, 0.0, 1.0]
    assert CALLS[-1]["answer"] == ["2", "4", "2"] and CALLS[-1]["source"] == ["a", "b", "a"]
    assert build_reward(f"{__name__}:first_char_code", answers_task)(["1+1="], ["a"]) == [97.0]
    arithmetic = load_task("arithmetic")  # the built-in task hands its sums over as `answer`
    assert build_reward(f"{__name__}:contains_answer", arithmetic)(["12+30="], ["= 42"]) == [1.0]


def test_rewards_of_a_list_are_summed_with_their_weights(answers_task):
    reward = build_reward(["length", f"{__name__}:contains_answer"], answers_task, weights=[2.0, 0.5])
    assert reward(["1+1=", "2+2="], ["2" * 10, "x"]) == pytest.approx([0.2 + 0.5, 0.02])
    with pytest.raises(ConfigError, match=r"reward_weights: 1 weights for 2 rewards"):
        load_config(None, ["model=m", f"reward=[length, {__name__}:contains_answer]", "reward_weights=[1]"])
    config = load_config(None, ["model=m", "reward=[task, length]", "reward_weights=[1, 0.1]"])
    assert config.reward_names == ["task", "length"]


@pytest.mark.parametrize(
    "function, message",
    [
        ("broken", r"function test_reward_functions:broken raised KeyError: 'score'"),
        ("one_short", r"function test_reward_functions:one_short returned 1 rewards for 2 completions"),
        ("not_a_number", r"function test_reward_functions:not_a_number returned nan at index 0"),
    ],
)
def test_a_failing_function_is_named(answers_task, function, message):
    reward = build_reward(f"{__name__}:{function}", answers_task)
    with pytest.raises(RewardFunctionError, match=message):
        reward(["1+1=", "2+2="], ["2", "4"])


def test_only_this_projects_rewards_run_in_the_producer_thread():
    assert runs_in_any_thread("task") and runs_in_any_thread(["length", "task"])
    assert not runs_in_any_thread("my_rewards:correct")
    assert not runs_in_any_thread(["task", "my_rewards:correct"])


def test_a_reward_that_cannot_be_imported_is_named(answers_task):
    with pytest.raises(ValueError, match=r"'no_such_module_x:score': cannot import 'no_such_module_x'"):
        build_reward("no_such_module_x:score", answers_task)
    with pytest.raises(ValueError, match=r"module 'test_reward_functions' has no function 'nope'"):
        build_reward(f"{__name__}:nope", answers_task)
    with pytest.raises(ValueError, match="unknown reward 'no such'"):
        build_reward(["length", "no such"], answers_task)


def test_run_stops_at_start_before_any_server_call(tiny_model_dir, length_task, tmp_path):
    """Nothing listens at the server URL: an import error must come first, before output is written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (closed again: a port nothing listens on)
    out = tmp_path / "out"
    config = TrainConfig(
        model=str(tiny_model_dir), server_url=f"http://127.0.0.1:{port}", task=str(length_task),
        reward=["length", "no_such_module_x:score"], output_dir=str(out), progress_bar=False,
        connect_timeout=1, max_retries=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="no_such_module_x:score"):
        run_training(config)
    assert not out.exists()


# --- end to end: chat rows, a reward function, TensorBoard --------------------------------------------
STEPS = 3
WEIGHTS = (1.0, 0.5)


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    """The tiny model (the weights the server serves) with a chat template of our own."""
    return with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("chat-model") / "tiny-chat")


@pytest.fixture(scope="module")
def chat_run(server, chat_model, tmp_path_factory):
    rows = [
        {"messages": [{"role": "system", "content": "Count."}, {"role": "user", "content": f"Up to {i}?"}],
         "answer": str(i)}
        for i in range(12)
    ]  # fmt: skip
    task = tmp_path_factory.mktemp("chat-task") / "count.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("chat-run")
    CALLS.clear()
    summary = run_training(
        TrainConfig(
            model=str(chat_model), server_url=server.url, api_key=server.api_key, task=str(task),
            reward=[f"{__name__}:contains_answer", "length"], reward_weights=list(WEIGHTS),
            report_to=["tensorboard"], steps=STEPS, batch_size=4, samples_per_prompt=4, max_new_tokens=16,
            learning_rate=1e-3, progress_bar=False, precision="fp32", output_dir=str(out),
        )
    )  # fmt: skip
    return summary, read_metrics(out), list(CALLS), rows, out


def test_chat_rows_train_with_a_reward_function(chat_run, chat_model):
    summary, records, calls, rows, _ = chat_run
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and summary["steps"] == STEPS
    assert all(r["pairs"] > 0 for r in records)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    rendered = {
        tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True): r
        for r in rows
    }
    assert len(calls) == STEPS  # once per step, on the whole batch of B*K samples
    # a user's function is called in the main thread (as a signal.alarm timeout needs), so the reference's
    # log-probabilities are taken in the step, not ahead by the producer thread
    assert all(call["in_main_thread"] for call in calls)
    assert all(r["reference_seconds"] == 0 for r in records)
    for call, record in zip(calls, records, strict=True):
        assert len(call["prompts"]) == len(call["completions"]) == 4 * 4
        # the server was asked for the chat-rendered prompts, and the function got each prompt's own row
        assert all(p in rendered for p in call["prompts"])
        assert call["answer"] == [rendered[p]["answer"] for p in call["prompts"]]
        assert call["messages"] == [rendered[p]["messages"] for p in call["prompts"]]
        # the logged reward is the weighted sum: contains_answer x 1.0 + length x 0.5
        total = [
            WEIGHTS[0] * float(a in c) + WEIGHTS[1] * len(c) / 100
            for a, c in zip(call["answer"], call["completions"], strict=True)
        ]
        assert record["reward_mean"] == pytest.approx(sum(total) / len(total))


def test_tensorboard_has_the_metric_keys(chat_run):
    _, records, _, _, out = chat_run
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    expected = scalars(records[0])
    assert {"reward_mean", "loss", "kl", "gen_seconds", "push_seconds"} <= expected.keys()
    assert expected.keys() <= set(events.Tags()["scalars"])
    for key in expected:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(scalars(r)[key], rel=1e-6)) for r in records], key
