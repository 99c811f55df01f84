"""Reward functions: ``(prompts, completions) -> rewards``, one float per completion.

``build_reward`` turns the config's ``reward`` value into such a function:

- ``task``: the task's own programmatic reward (the default);
- ``length``: the completion's length in characters divided by 100 (a learnable toy signal for smoke
  tests and benchmarks on models whose samples are noise);
- a folder of a sequence-classification reward model (``AutoModelForSequenceClassification`` with one
  output): the score of the prompt followed by the completion.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from trainer_client.tasks import Task

RewardFn = Callable[[list[str], list[str]], list[float]]

BUILTIN_REWARDS = ("task", "length")


def task_reward(task: Task) -> RewardFn:
    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return [float(task.reward(p, c)) for p, c in zip(prompts, completions, strict=True)]

    return reward


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    return [len(c) / 100.0 for c in completions]


class RewardModel:
    """A sequence-classification model that scores ``prompt + completion`` (no grad, batched)."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has {self.model.config.num_labels} outputs; expected 1")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True)
                logits = self.model(**enc.to(self.device)).logits  # (b, 1)
                scores.extend(logits[:, 0].float().tolist())
        return scores


def build_reward(name_or_dir: str, task: Task, device: str = "cpu") -> RewardFn:
    """The reward function named by the config's ``reward`` (see the module docstring)."""
    if name_or_dir == "task":
        if getattr(task, "has_answers", True) is False:
            raise ValueError(
                f"task {task.name!r} has no programmatic reward (its rows have no 'answer'); "
                f"set `reward` to a reward model folder or one of {list(BUILTIN_REWARDS)}"
            )
        return task_reward(task)
    if name_or_dir == "length":
        return length_reward
    path = Path(name_or_dir)
    if path.is_dir():
        return RewardModel(path, device=device)
    raise ValueError(
        f"unknown reward {name_or_dir!r}: not one of {list(BUILTIN_REWARDS)} and not a reward model folder"
    )
