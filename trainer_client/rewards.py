"""Reward functions: ``(prompts, completions) -> rewards``, one float per completion.

``build_reward`` turns the config's ``reward`` value (one name or a list) into such a function:

- ``task``: the task's own programmatic reward (the default);
- ``length``: the completion's length in characters divided by 100 (a learnable toy signal for smoke
  tests and benchmarks on models whose samples are noise);
- a folder of a sequence-classification reward model (``AutoModelForSequenceClassification`` with one
  output): the score of the prompt followed by the completion;
- ``package.module:function``: a user's batch function ``(prompts, completions, **row_fields)``, where
  ``row_fields`` are the columns of the prompts' rows (``task.row_fields``), each a list aligned with
  ``prompts``; a function without ``**kwargs`` gets only the columns it names as parameters;
- a list of these: their sum, weighted by ``weights``.

A function that raises, or answers with other than one finite number per completion, stops the run with a
:class:`RewardFunctionError` that names it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from trainer_client.tasks import Task

RewardFn = Callable[[list[str], list[str]], list[float]]

BUILTIN_REWARDS = ("task", "length")
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
"""``package.module:function``."""


class RewardFunctionError(RuntimeError):
    """A reward function failed or answered wrongly during the run; the message names it."""


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


def import_reward_function(path: str) -> Callable:
    """The function ``package.module:function`` names, imported now (the working directory is importable,
    as for ``python -m``). A ValueError names ``path`` when it cannot be had."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward {path!r}: cannot import {module_name!r} ({e}); it must be importable from the working "
            "directory or PYTHONPATH"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def function_reward(path: str, fn: Callable, task: Task) -> RewardFn:
    """``fn(prompts, completions, **row_fields)`` as a checked ``(prompts, completions) -> rewards``."""
    params = inspect.signature(fn).parameters.values()
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    row_fields = getattr(task, "row_fields", None)

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        fields = row_fields(prompts) if row_fields is not None else {}
        fields = {
            k: v
            for k, v in fields.items()
            if (takes_all or k in named) and k not in ("prompts", "completions")
        }
        try:
            values = fn(prompts, completions, **fields)
        except Exception as e:
            raise RewardFunctionError(f"reward function {path} raised {type(e).__name__}: {e}") from e
        return checked(path, values, len(completions))

    return reward


def checked(name: str, values, expected: int) -> list[float]:
    """``values`` as floats, or a RewardFunctionError naming ``name``: one finite number per completion."""
    try:
        values = list(values)
    except TypeError:
        raise RewardFunctionError(
            f"reward function {name} returned {type(values).__name__}, not a list of floats"
        ) from None
    if len(values) != expected:
        raise RewardFunctionError(
            f"reward function {name} returned {len(values)} rewards for {expected} completions"
        )
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise RewardFunctionError(
                f"reward function {name} returned {v!r} at index {i}, not a finite number"
            )
    return [float(v) for v in values]


def weighted_sum(parts: list[tuple[RewardFn, float]]) -> RewardFn:
    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        total = [0.0] * len(completions)
        for fn, weight in parts:
            total = [t + weight * r for t, r in zip(total, fn(prompts, completions), strict=True)]
        return total

    return reward


def build_one(name_or_dir: str, task: Task, device: str) -> RewardFn:
    if name_or_dir == "task":
        if getattr(task, "has_answers", True) is False:
            raise ValueError(
                f"task {task.name!r} has no programmatic reward (its rows have no answer); "
                f"set `reward` to a reward function, a reward model folder or one of {list(BUILTIN_REWARDS)}"
            )
        return task_reward(task)
    if name_or_dir == "length":
        return length_reward
    path = Path(name_or_dir)
    if path.is_dir():
        return RewardModel(path, device=device)
    if IMPORT_PATH.match(name_or_dir):
        return function_reward(name_or_dir, import_reward_function(name_or_dir), task)
    raise ValueError(
        f"unknown reward {name_or_dir!r}: not one of {list(BUILTIN_REWARDS)}, a reward model folder or "
        "a function package.module:function"
    )


def runs_in_any_thread(name_or_list: str | list[str]) -> bool:
    """Whether the rewards named are all this module's own (``task``, ``length``, reward models), which the
    trainer may call from its producer thread. A user's function is called in the main thread, where some
    must be: a timeout by ``signal.alarm`` (math_verify's, for one) works only there."""
    names = [name_or_list] if isinstance(name_or_list, str) else list(name_or_list)
    return not any(IMPORT_PATH.match(name) and not Path(name).is_dir() for name in names)


def build_reward(
    name_or_list: str | list[str], task: Task, device: str = "cpu", weights: list[float] | None = None
) -> RewardFn:
    """The reward function named by the config's ``reward`` and ``reward_weights`` (see the module
    docstring). Everything is imported and loaded here, so a bad name fails before training starts."""
    names = [name_or_list] if isinstance(name_or_list, str) else list(name_or_list)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"reward_weights: {len(weights)} weights for {len(names)} rewards {names}")
    parts = [(build_one(name, task, device), weight) for name, weight in zip(names, weights, strict=True)]
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return weighted_sum(parts)
