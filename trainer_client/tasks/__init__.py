"""Tasks: where prompts come from and, when it can be computed, how a completion is scored.

A task is any object with the attributes of :class:`Task`. Built-in tasks are registered by name in
``TASKS``; ``load_task`` also accepts reasoning-gym's procedural datasets, ``reasoning-gym:NAME[,NAME...]``
(tasks/reasoning_gym.py), and rows of data (tasks/dataset.py): a JSONL, JSON, Parquet or CSV file, a folder
of them, or a Hub dataset, whose rows hold a text prompt or chat messages and optionally an answer for an
exact-match reward. Register a new task with ``register_task`` or by adding a
``"name": "module:Class"`` entry to ``_BUILTIN``, which is imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from trainer_client.tasks.dataset import (
    DATA_SUFFIXES,
    HUB_NAME,
    DataFields,
    JsonlTask,
    RowsTask,
    cycle_prompts,
    load_dataset_task,
)
from trainer_client.tasks.reasoning_gym import GymSettings, is_reasoning_gym, load_reasoning_gym_task

__all__ = [
    "TASKS", "DataFields", "GymSettings", "JsonlTask", "RowsTask", "Task", "cycle_prompts", "load_task",
    "register_task", "task_hint",
]  # fmt: skip


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task. ``stop`` and ``max_new_tokens`` are optional hints, and so is
    ``row_fields(prompts) -> {column: [value per prompt]}``: what reward functions get beside the prompts
    and completions (see rewards.py)."""

    name: str

    def train_prompts(self, step: int, n: int, seed: int) -> list[str]:
        """``n`` training prompts for ``step``, a pure function of ``(seed, step)`` so a resumed run
        sees the same data."""
        ...

    def eval_prompts(self) -> list[str]:
        """Held-out prompts, never returned by ``train_prompts``."""
        ...

    def reward(self, prompt: str, completion: str) -> float:
        """Programmatic reward of ``completion`` for ``prompt``."""
        ...


def task_hint(task: Task, name: str):
    """An optional hint of a task (``stop``, ``max_new_tokens``), or None."""
    return getattr(task, name, None)


def _lazy(target: str) -> Callable[[], Task]:
    """A factory that imports ``"module:Class"`` only when called."""

    def factory() -> Task:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)()

    factory.__qualname__ = f"lazy({target})"
    return factory


_BUILTIN = {
    "arithmetic": "trainer_client.tasks.arithmetic:ArithmeticTask",
}

TASKS: dict[str, Callable[[], Task]] = {name: _lazy(target) for name, target in _BUILTIN.items()}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make ``load_task(name)`` return ``factory()``."""
    TASKS[name] = factory


def load_task(
    name_or_path: str, fields: DataFields | None = None, tokenizer=None, gym: GymSettings | None = None
) -> Task:
    """A built-in task by name; reasoning-gym's datasets, ``reasoning-gym:NAME[,NAME...]``, with the
    config's keys for them in ``gym``; else a task of rows from a data file, a folder or a Hub dataset
    (``owner/name[:config]``), whose columns ``fields`` names. ``tokenizer`` (the policy's) renders chat
    prompts: rows of chat messages, and every reasoning-gym prompt."""
    if name_or_path in TASKS:
        return TASKS[name_or_path]()
    if is_reasoning_gym(name_or_path):
        return load_reasoning_gym_task(name_or_path, tokenizer, gym)
    path = Path(name_or_path)
    if path.exists() or path.suffix in DATA_SUFFIXES or HUB_NAME.match(name_or_path):
        return load_dataset_task(name_or_path, fields or DataFields(), tokenizer)
    raise ValueError(
        f"unknown task {name_or_path!r}: not one of {sorted(TASKS)}, reasoning-gym:NAME (a reasoning-gym "
        f"dataset, e.g. reasoning-gym:chain_sum), a data file or folder "
        f"({', '.join(sorted(DATA_SUFFIXES))}) or a Hub dataset name owner/name"
    )
