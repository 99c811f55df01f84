"""Tasks: where prompts come from and, when it can be computed, how a completion is scored.

A task is any object with the attributes of :class:`Task`. Built-in tasks are registered by name in
``TASKS``; ``load_task`` also accepts the path of a JSONL file of ``{"prompt": ...}`` rows (with an
optional ``"answer"`` for an exact-match reward). Register a new task with ``register_task`` or by
adding a ``"name": "module:Class"`` entry to ``_BUILTIN``, which is imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task. ``stop`` and ``max_new_tokens`` are optional hints."""

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


def cycle_prompts(pool: list[str], step: int, n: int, seed: int) -> list[str]:
    """Deterministic epochs over ``pool``: each epoch is a permutation seeded by ``(seed, epoch)``, and
    step ``step`` takes the next ``n`` prompts. The same ``(seed, step)`` always gives the same prompts."""
    out = []
    for i in range(step * n, step * n + n):
        epoch, index = divmod(i, len(pool))
        order = list(range(len(pool)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out.append(pool[order[index]])
    return out


class JsonlTask:
    """Prompts from a JSONL file of ``{"prompt": str, "answer": str (optional), "split": "train" | "eval"
    (optional)}`` rows.

    Held-out prompts are the rows marked ``"split": "eval"``; if no row is marked, the last tenth of the
    rows (at least one) when the file has 10 or more rows, else the training rows themselves.
    The reward is exact match against ``answer``: 1.0 when the completion, stripped and cut at its first
    newline, equals the answer, else 0.0. A row without an answer has no programmatic reward.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.stem
        self.stop: list[str] | None = None
        self.max_new_tokens: int | None = None
        rows = []
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{self.path}:{lineno}: each row needs a string field 'prompt'")
            rows.append(row)
        if not rows:
            raise ValueError(f"{self.path}: no prompts")
        self.answers = {row["prompt"]: row.get("answer") for row in rows}
        train = [r["prompt"] for r in rows if r.get("split", "train") != "eval"]
        held_out = [r["prompt"] for r in rows if r.get("split") == "eval"]
        if not held_out and len(train) >= 10:
            cut = len(train) - max(1, len(train) // 10)
            train, held_out = train[:cut], train[cut:]
        self._train = train or held_out
        self._eval = held_out or train

    @property
    def has_answers(self) -> bool:
        return any(a is not None for a in self.answers.values())

    def train_prompts(self, step: int, n: int, seed: int) -> list[str]:
        return cycle_prompts(self._train, step, n, seed)

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def reward(self, prompt: str, completion: str) -> float:
        answer = self.answers.get(prompt)
        if answer is None:
            raise ValueError(
                f"task {self.name!r}: prompt has no 'answer', so it has no programmatic reward; "
                "set `reward` to a reward model folder or another built-in reward"
            )
        lines = completion.strip().splitlines()
        return float(bool(lines) and lines[0].strip() == str(answer).strip())


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


def load_task(name_or_path: str) -> Task:
    """A built-in task by name, or a :class:`JsonlTask` from a ``.jsonl`` path."""
    if name_or_path in TASKS:
        return TASKS[name_or_path]()
    path = Path(name_or_path)
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist")
        return JsonlTask(path)
    raise ValueError(f"unknown task {name_or_path!r}: not one of {sorted(TASKS)} and not a JSONL file")
