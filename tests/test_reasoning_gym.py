"""reasoning-gym's datasets as a task (trainer_client/tasks/reasoning_gym.py), on CPU without vLLM: chat
prompts, disjoint held-out and training questions, determinism, the verifiers' rewards, mixes, errors that
name what is wrong, the config's keys and ``trainer-client eval`` with a stand-in for the server."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
from chat_model import with_chat_template
from transformers import AutoTokenizer

from trainer_client import evaluate
from trainer_client.config import ConfigError, TrainConfig, load_config
from trainer_client.rewards import build_reward
from trainer_client.tasks import GymSettings, load_task
from trainer_client.tasks.reasoning_gym import SYSTEM_PROMPTS, allocate, last_line_answer

pytest.importorskip("reasoning_gym")

TINY_SUMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
"""chain_sum with two one-digit terms: 10 x 10 x 2 = 200 distinct questions, so questions repeat."""


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with the test chat template "<|role|>content\\n"."""
    return with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("rg") / "chat")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def gym_task(tokenizer, task="reasoning-gym:chain_sum", **settings):
    return load_task(task, tokenizer=tokenizer, gym=GymSettings(**settings))


def chat(question: str, system: str | None = SYSTEM_PROMPTS["last_line"]) -> str:
    return (f"<|system|>{system}\n" if system else "") + f"<|user|>{question}\n<|assistant|>"


def test_loads_with_no_options_as_chats_with_the_format_instruction(tokenizer):
    task = load_task("reasoning-gym:chain_sum", tokenizer=tokenizer)  # the config's defaults
    prompts = task.eval_prompts()
    assert task.name == "reasoning-gym:chain_sum" and 490 <= len(prompts) <= 500  # (repeats dropped)
    assert len(set(prompts)) == len(prompts)
    fields = task.row_fields(prompts[:3])
    assert set(fields) >= {"answer", "question", "dataset"} and fields["dataset"] == ["chain_sum"] * 3
    assert prompts[:3] == [chat(q) for q in fields["question"]]
    assert fields["question"][0].startswith("State the final answer to the following arithmetic problem:")
    assert task.max_new_tokens and task.stop is None
    assert len(task.train_prompts(0, 8, seed=0)) == 8


def test_held_out_questions_are_never_trained_on(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer_client"):
        task = gym_task(tokenizer, options=TINY_SUMS, train_size=1000, eval_size=150)
    held_out = set(task.eval_prompts())
    trained = {p for step in range(200) for p in task.train_prompts(step, 8, seed=3)}
    assert held_out and trained and not held_out & trained
    assert len(held_out | trained) <= 200  # the whole space
    assert "distinct training questions" in caplog.text  # few are left after 150 draws held out


def test_prompts_are_a_function_of_seed_and_step(tokenizer):
    a = gym_task(tokenizer, options=TINY_SUMS, train_size=300, eval_size=50)
    b = gym_task(tokenizer, options=TINY_SUMS, train_size=600, eval_size=50)
    assert a.eval_prompts() == b.eval_prompts()  # fixed seed: the same held-out set whatever else changes
    again = gym_task(tokenizer, options=TINY_SUMS, train_size=300, eval_size=50)
    for step in (0, 1, 37, 500):  # 500 x 8 prompts: past the end of several epochs of the pool
        assert a.train_prompts(step, 8, seed=1) == again.train_prompts(step, 8, seed=1)
    assert a.train_prompts(0, 8, seed=1) != a.train_prompts(0, 8, seed=2)
    assert a.train_prompts(0, 8, seed=1) != a.train_prompts(1, 8, seed=1)
    # each epoch is one pass over the pool: 300 prompts drawn as steps of 10 are the pool's 300 in some order
    epoch = [p for step in range(30) for p in a.train_prompts(step, 10, seed=5)]
    assert Counter(epoch) == Counter(a._train_prompts)


def test_reward_is_the_verifiers_score_of_the_extracted_answer(tokenizer):
    task = gym_task(tokenizer, options=TINY_SUMS, train_size=100, eval_size=40)
    prompt = next(p for p in task.eval_prompts() if len(task.row_fields([p])["answer"][0]) == 2)
    answer = task.row_fields([prompt])["answer"][0]  # e.g. "12"
    assert task.reward(prompt, answer) == 1.0
    assert task.reward(prompt, f"Let me add.\nThe answer is {answer}.\n") == 1.0
    assert task.reward(prompt, f"**Answer:** {answer}") == 1.0
    assert task.reward(prompt, f"{answer}\nsomething else") == 0.0  # only the last line counts
    assert task.reward(prompt, "") == 0.0 and task.reward(prompt, "-99") == 0.0
    assert task.reward(prompt, f"x{answer}") == pytest.approx(2 / 3)  # chain_sum's partial credit, unchanged
    assert build_reward("task", task)([prompt] * 2, [answer, "0"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="did not give"):
        task.reward("some other prompt", answer)


def test_last_line_extraction():
    assert last_line_answer("3 + 4 = 7\nAnswer: **7**.") == "7"
    assert last_line_answer("The final answer to the problem is -4.") == "-4"
    assert last_line_answer("\n  \n") is None
    assert last_line_answer("answers vary") == "answers vary"  # a word that only begins like "answer"


def test_answer_tag_format_and_custom_system_prompts(tokenizer):
    task = gym_task(tokenizer, options=TINY_SUMS, train_size=50, eval_size=20, answer_format="answer_tag")
    prompt = task.eval_prompts()[0]
    question, answer = (task.row_fields([prompt])[k][0] for k in ("question", "answer"))
    assert prompt == chat(question, SYSTEM_PROMPTS["answer_tag"]) and task.stop == ["</answer>"]
    assert task.reward(prompt, f"4 and 3...<answer>{answer}</answer>") == 1.0
    assert task.reward(prompt, f"thinking <answer> {answer}") == 1.0  # cut at the stop string </answer>
    assert task.reward(prompt, answer) == 0.0  # no tag, no answer
    custom = gym_task(tokenizer, options=TINY_SUMS, train_size=50, eval_size=20, system_prompt="Be exact.")
    assert custom.eval_prompts()[0] == chat(question, "Be exact.")
    bare = gym_task(tokenizer, options=TINY_SUMS, train_size=50, eval_size=20, system_prompt="")
    assert bare.eval_prompts()[0] == chat(question, None)


def test_a_weighted_mix_draws_from_each_dataset_by_weight(tokenizer):
    options = {"chain_sum": {"weight": 3, **TINY_SUMS}, "leg_counting": {"min_animals": 1, "max_animals": 2}}
    task = gym_task(
        tokenizer, "reasoning-gym:chain_sum,leg_counting", options=options, train_size=400, eval_size=40
    )
    assert Counter(task.row_fields(task.eval_prompts())["dataset"]) == {"chain_sum": 30, "leg_counting": 10}
    drawn = [p for step in range(25) for p in task.train_prompts(step, 16, seed=0)]  # one epoch of 400
    assert Counter(task.row_fields(drawn)["dataset"]) == {"chain_sum": 300, "leg_counting": 100}
    legs = next(p for p in task.eval_prompts() if task.dataset_of(p) == "leg_counting")
    right = task.row_fields([legs])["answer"][0]
    assert task.reward(legs, f"Counting legs.\n{right}") == 1.0  # leg_counting's own verifier
    equal = gym_task(tokenizer, "reasoning-gym:chain_sum,leg_counting", train_size=100, eval_size=10)
    assert Counter(equal.row_fields(equal.eval_prompts())["dataset"]) == {"chain_sum": 5, "leg_counting": 5}
    assert allocate(10, [1, 1, 1]) == [4, 3, 3] and allocate(2, [100, 1]) == [1, 1]


@pytest.mark.parametrize(
    ("task", "options", "error"),
    [
        ("reasoning-gym:chain_summ", {}, r"no dataset 'chain_summ'.*did you mean chain_sum"),
        ("reasoning-gym:chain_sum", {"min_term": 2}, r"chain_sum: unknown config key 'min_term'.*min_terms"),
        ("reasoning-gym:chain_sum", {"min_terms": 0}, r"chain_sum: .*min_terms must be positive"),
        ("reasoning-gym:chain_sum", {"seed": 1}, r"\['seed'\] of chain_sum are set by the task"),
        ("reasoning-gym:chain_sum", {"weight": 2}, r"weigh.* a mix"),
        ("reasoning-gym:chain_sum,leg_counting", {"gcd": {}}, r"\['gcd'\] not among the datasets"),
        (
            "reasoning-gym:chain_sum,leg_counting",
            {"chain_sum": {"weight": -1}},
            r"chain_sum.weight: .*positive",
        ),
        ("reasoning-gym:chain_sum,leg_counting", {"leg_counting": 3}, r"task_options.leg_counting: expected"),
        ("reasoning-gym:chain_sum,chain_sum", {}, r"named twice"),
        ("reasoning-gym:", {}, r"expected reasoning-gym:NAME"),
        ("reasoning-gym:composite", {}, r"composite: not supported.*NAME,NAME"),
    ],
)
def test_errors_name_the_dataset_and_the_key(tokenizer, task, options, error):
    with pytest.raises(ValueError, match=error):
        gym_task(tokenizer, task, options=options, train_size=10, eval_size=5)
    with pytest.raises(ConfigError, match=error):  # the same, at config time
        load_config(None, base={"model": "m", "task": task, "task_options": options})


def test_missing_package_tokenizer_or_chat_template(tokenizer, tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load_task("reasoning-gym:chain_sum")
    no_template = AutoTokenizer.from_pretrained(with_chat_template(tiny_model_dir, tmp_path / "none", None))
    with pytest.raises(ValueError, match="has no chat template"):
        gym_task(no_template, train_size=10, eval_size=5)
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'online-dpo-server\[reasoning-gym\]'"):
        gym_task(tokenizer, train_size=10, eval_size=5)


def test_config_keys(tokenizer):
    config = TrainConfig(
        model="m", task="reasoning-gym:chain_sum,leg_counting", task_options={"chain_sum": {"weight": 2}},
        task_train_size=50, task_eval_size=30, answer_format="answer_tag",
    )  # fmt: skip
    settings = GymSettings.of_config(config)
    assert (settings.train_size, settings.eval_size, settings.answer_format) == (50, 30, "answer_tag")
    task = load_task(config.task, tokenizer=tokenizer, gym=settings)
    assert Counter(task.row_fields(task.eval_prompts())["dataset"]) == {"chain_sum": 20, "leg_counting": 10}
    assert TrainConfig(model="m").task_options == {}
    for override, error in [
        ("task_options={min_terms: 2}", r"\['task_options'\] apply only to `task: reasoning-gym:NAME`"),
        ("answer_format=answer_tag", r"\['answer_format'\] apply only"),
        ("answer_format=boxed", r"answer_format: Input should be 'last_line' or 'answer_tag'"),
        ("task_eval_size=0", r"task_eval_size: Input should be greater than or equal to 1"),
        ("task_options=[1]", r"task_options: Input should be a valid dictionary"),
    ]:
        with pytest.raises(ConfigError, match=error):
            load_config(None, [override], base={"model": "m"})


def test_eval_command_scores_with_the_verifier(model_dir, monkeypatch, capsys):
    """``trainer-client eval --task reasoning-gym:...`` builds the task with the model's chat template and
    scores greedy completions with the verifier; a stand-in answers in place of the server."""

    class HalfRight:  # the right answer for every other prompt
        def __init__(self, task):
            self.task = task

        def generate(self, prompts, n, temperature, max_tokens, stop):
            answers = self.task.row_fields(prompts)["answer"]
            texts = [f"Adding.\n{a}" if i % 2 == 0 else "Adding.\n1000" for i, a in enumerate(answers)]
            results = [
                SimpleNamespace(completions=[SimpleNamespace(text=t, finish_reason="stop")]) for t in texts
            ]
            return SimpleNamespace(results=results, weights_version=0)

    seen = {}

    def fake(args, task):
        seen["task"] = task
        return evaluate.evaluate(HalfRight(task), task, args.max_new_tokens), args.model

    monkeypatch.setattr(evaluate, "_evaluate_as_asked", fake)
    argv = ["--model", str(model_dir), "--task", "reasoning-gym:chain_sum", "--json"]
    argv += ["--set", "task_eval_size=20", "--set", "task_options={min_terms: 2, max_terms: 2}"]
    assert evaluate.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    task = seen["task"]
    assert result["prompts"] == len(task.eval_prompts()) == 20 and result["mean_reward"] == 0.5
    assert task.eval_prompts()[0].startswith(f"<|system|>{SYSTEM_PROMPTS['last_line']}\n<|user|>")
    assert all(e.count(" + ") + e.count(" - ") == 1 for e in task.row_fields(task.eval_prompts())["question"])
    assert evaluate.main([*argv[:4], "--set", "steps=3"]) == 2  # not a task key
    assert "eval takes only" in capsys.readouterr().err
    assert evaluate.main([*argv[:4], "--set", "task_options={max_term: 2}"]) == 2
    assert "unknown config key 'max_term'" in capsys.readouterr().err
