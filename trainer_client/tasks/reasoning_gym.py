"""reasoning-gym's procedural datasets as a task: ``task: reasoning-gym:NAME`` or a weighted mix
``reasoning-gym:NAME,NAME``.

reasoning-gym (``pip install 'online-dpo-server[reasoning-gym]'``) generates questions with a verifier per
dataset: ``create_dataset(name, size=, seed=, **config)`` gives entries ``{"question", "answer",
"metadata"}`` and ``dataset.score_answer(answer, entry)`` scores an extracted answer (exact, numeric or with
partial credit, as the dataset decides). This module turns them into the trainer's task:

- Prompts are chats rendered with the policy tokenizer's chat template: a system message that asks for the
  answer format the reward reads (``answer_format``; or the config's own ``system_prompt``) and the question
  as the user message. A model without a chat template is refused: reasoning-gym's questions are
  instructions, and a base model continuing ``question\\nAnswer:`` would need a stop string per dataset to
  end its answer, which no format here can promise.
- The held-out set is generated from a fixed seed per dataset (not the run's seed), so every run is
  evaluated on the same questions; repeats are dropped. The training pool is generated from another fixed
  seed, and every question whose text is in the held-out set is dropped from it: small procedural spaces
  repeat questions, and training on the held-out questions would inflate the evaluation.
- ``train_prompts(step, n, seed)`` cycles through the pool in epochs, each a permutation seeded by
  ``(seed, epoch)``: a pure function of ``(seed, step)``, so a resumed run sees the same prompts.
- ``reward(prompt, completion)`` extracts the answer and returns the dataset's own ``score_answer``.

reasoning-gym imports all of its ~100 datasets at once (about 2 s), so it is imported only when such a task
is asked for, never by ``import trainer_client``.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
import re
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal

from trainer_client.tasks.dataset import ChatTemplate, DataFields

log = logging.getLogger("trainer_client")

PREFIX = "reasoning-gym:"
INSTALL = "pip install 'online-dpo-server[reasoning-gym]'"
AnswerFormat = Literal["last_line", "answer_tag"]
ANSWER_FORMATS: tuple[str, ...] = ("last_line", "answer_tag")

SYSTEM_PROMPTS: dict[str, str] = {
    "last_line": "Solve the problem. Put only the final answer on the last line.",
    "answer_tag": (
        "Solve the problem. Then write only the final answer between <answer> and </answer> tags, "
        "like <answer>42</answer>."
    ),
}
"""The system message per ``answer_format``: short, because the intended policies are small models that
follow one plain instruction better than a paragraph of rules."""

MANAGED_KEYS = ("seed", "size")
"""Config fields of every reasoning-gym dataset that this module sets itself (from fixed seeds and the
``task_train_size`` / ``task_eval_size`` keys)."""
NOT_SUPPORTED = {"composite": "name the datasets as a mix instead: task: reasoning-gym:NAME,NAME"}
TINY_POOL = 100
"""Fewer distinct training questions than this for a dataset earns a warning: the policy can memorize them."""
EVAL_SEED, TRAIN_SEED = "eval", "train"


# --- answer extraction --------------------------------------------------------------------------------------
_LEAD = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\b,?\s*)?(?:the\s+)?(?:final\s+)?answer\b(?:[^:=\n]*?\bis\b)?"
    r"\s*[:=]?\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)


def last_line_answer(completion: str) -> str | None:
    """The completion's last non-empty line, without a leading "Answer:", "Final answer:" or "The answer (to
    ...) is" (case ignored), markdown bold around it, or a trailing period; None for an empty completion.

    The verifiers compare strings or numbers, and small models like to dress the answer ("**Answer:** 12.")
    even when asked not to; this strips only such wrapping, never words inside the answer."""
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    if not lines:
        return None
    text = lines[-1]
    for _ in range(2):  # "**Answer:** 12." and "Answer: **12**." both come out as "12"
        text = text.removeprefix("**").strip()
        text = _LEAD.sub("", text, count=1).strip()
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
        text = text.removeprefix("**").removesuffix("**").strip()
    return text or None


def answer_tag_answer(completion: str) -> str | None:
    """The text in the last ``<answer>...</answer>`` (reasoning-gym's own ``extract_answer``); a trailing
    ``<answer>`` left open counts too, since generation stops at the ``</answer>`` stop string, which the
    server leaves out of the completion."""
    from reasoning_gym.utils import extract_answer

    found = extract_answer(completion)
    if found is None and "<answer>" in completion:
        found = completion.rsplit("<answer>", 1)[1].strip()
    return found or None


EXTRACTORS = {"last_line": last_line_answer, "answer_tag": answer_tag_answer}


# --- names and options -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the task: its reasoning-gym name, its share of the prompts, and its config."""

    name: str
    weight: float = 1.0
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GymSettings:
    """The config's keys of a reasoning-gym task (see config.py): ``options`` is ``task_options``."""

    options: Mapping[str, Any] = field(default_factory=dict)
    train_size: int = 10_000
    """Questions generated for the training pool; 0 builds a task for evaluation only (``trainer-client
    eval``)."""
    eval_size: int = 500
    answer_format: AnswerFormat = "last_line"
    system_prompt: str | None = None

    @classmethod
    def of_config(cls, config, train_size: int | None = None) -> GymSettings:
        """The reasoning-gym keys of a ``TrainConfig``; ``train_size`` overrides its ``task_train_size``
        (0: evaluation only)."""
        return cls(
            options=dict(config.task_options),
            train_size=config.task_train_size if train_size is None else train_size,
            eval_size=config.task_eval_size,
            answer_format=config.answer_format,
            system_prompt=config.system_prompt,
        )


def is_reasoning_gym(task: str) -> bool:
    return task.startswith(PREFIX)


def dataset_names(task: str) -> list[str]:
    """``"reasoning-gym:a,b"`` -> ``["a", "b"]``; a ValueError says what a malformed name lacks."""
    body = task[len(PREFIX) :] if is_reasoning_gym(task) else task
    names = [name.strip() for name in body.split(",")]
    if not body.strip() or not all(names):
        raise ValueError(
            f"task {task!r}: expected reasoning-gym:NAME or reasoning-gym:NAME,NAME,... "
            "(reasoning-gym's dataset names, e.g. reasoning-gym:chain_sum)"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"task {task!r}: {repeated} named twice; give a dataset once, with a weight")
    return names


def dataset_specs(task: str, options: Mapping[str, Any] | None = None) -> list[DatasetSpec]:
    """The datasets of ``task`` with their weights and configs from ``task_options``, checked for shape only
    (no reasoning-gym import): for one dataset, ``task_options`` is its config (also accepted nested under
    its name, as in a mix); for a mix, ``{name: {weight: w, **config}}`` for any of its datasets."""
    names = dataset_names(task)
    options = dict(options or {})
    nested = len(names) > 1 or (set(options) == {names[0]} and isinstance(options[names[0]], Mapping))
    if not nested:
        if "weight" in options:
            raise ValueError(
                f"task_options: 'weight' weighs the datasets of a mix; {task} has one dataset (drop it)"
            )
        return [DatasetSpec(names[0], 1.0, _checked_config(names[0], options, "task_options"))]
    unknown = [key for key in options if key not in names]
    if unknown:
        raise ValueError(
            f"task_options: {unknown} not among the datasets of {task} ({names}); for a mix, task_options "
            "maps each dataset's name to {weight: ..., <its config keys>}"
        )
    specs = []
    for name in names:
        entry = options.get(name, {})
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"task_options.{name}: expected a mapping {{weight: ..., <config keys>}}, got {entry!r}"
            )
        config = dict(entry)
        weight = config.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not (0 < weight < math.inf):
            raise ValueError(f"task_options.{name}.weight: expected a positive number, got {weight!r}")
        specs.append(DatasetSpec(name, float(weight), _checked_config(name, config, f"task_options.{name}")))
    return specs


def _checked_config(name: str, config: Mapping[str, Any], where: str) -> dict:
    managed = [key for key in MANAGED_KEYS if key in config]
    if managed:
        raise ValueError(
            f"{where}: {managed} of {name} are set by the task (the held-out and training questions come "
            "from fixed seeds; their numbers are task_eval_size and task_train_size); drop them"
        )
    return dict(config)


def import_reasoning_gym():
    """The reasoning_gym package, or a ValueError that says how to install it."""
    try:
        import reasoning_gym
    except ModuleNotFoundError as e:
        if e.name != "reasoning_gym":
            raise
        raise ValueError(f"reasoning-gym tasks need the reasoning-gym package: {INSTALL}") from None
    return reasoning_gym


def _registry() -> dict[str, tuple[type, type]]:
    import_reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return DATASETS


def create(spec: DatasetSpec, size: int, seed: int):
    """``reasoning_gym.create_dataset`` for ``spec``; every failure is a ValueError that names the dataset
    and, for a config key it does not know, the key and the keys it does know."""
    registry = _registry()
    if spec.name in NOT_SUPPORTED:
        raise ValueError(f"reasoning-gym:{spec.name}: not supported here; {NOT_SUPPORTED[spec.name]}")
    if spec.name not in registry:
        close = difflib.get_close_matches(spec.name, list(registry), n=4, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(
            f"reasoning-gym has no dataset {spec.name!r}: {hint}the names of its {len(registry)} datasets "
            "are the keys of reasoning_gym.factory.DATASETS (e.g. chain_sum, leg_counting, basic_arithmetic)"
        )
    config_fields = [f.name for f in fields(registry[spec.name][1]) if f.name not in MANAGED_KEYS]
    for key in spec.config:
        if key not in config_fields:
            close = difflib.get_close_matches(key, config_fields, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(
                f"reasoning-gym:{spec.name}: unknown config key {key!r} in task_options; {hint}"
                f"its keys are {config_fields}"
            )
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(spec.name, size=size, seed=seed, **spec.config)
    except Exception as e:  # the config's own checks are asserts; a wrong type may raise anything
        raise ValueError(
            f"reasoning-gym:{spec.name}: task_options {spec.config} rejected: {type(e).__name__}: {e}"
        ) from e


def check(task: str, options: Mapping[str, Any] | None = None) -> list[DatasetSpec]:
    """The datasets of ``task``, each created and asked for one question now, so a wrong name, config key or
    value fails at config time with a message that names it (imports reasoning-gym: about 2 s)."""
    specs = dataset_specs(task, options)
    for spec in specs:
        dataset = create(spec, size=1, seed=_seed(EVAL_SEED, spec.name))
        try:
            dataset[0]
        except Exception as e:
            raise ValueError(
                f"reasoning-gym:{spec.name}: cannot generate a question with task_options {spec.config}: "
                f"{type(e).__name__}: {e}"
            ) from e
    return specs


def _seed(purpose: str, name: str) -> int:
    """A fixed seed per (purpose, dataset), far from the others: reasoning-gym seeds item ``i`` with
    ``seed + i``, so nearby seeds would give the same questions shifted by one."""
    return zlib.crc32(f"online-dpo:{purpose}:{name}".encode()) % 2**31


def allocate(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder), at least 1 each when total allows."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    for i, count in enumerate(counts):  # a tiny total: take from the largest so no dataset has none
        if count == 0 and total >= len(weights):
            counts[max(range(len(counts)), key=counts.__getitem__)] -= 1
            counts[i] = 1
    return counts


# --- the task ----------------------------------------------------------------------------------------------
class ReasoningGymTask:
    """Questions of one or several reasoning-gym datasets, as chats, scored by the datasets' verifiers."""

    def __init__(self, task: str, tokenizer, settings: GymSettings = GymSettings()):
        self.name = task
        self.settings = settings
        if settings.answer_format not in EXTRACTORS:
            raise ValueError(f"answer_format {settings.answer_format!r}: expected one of {list(EXTRACTORS)}")
        if settings.eval_size < 1 or settings.train_size < 0:
            raise ValueError("task_eval_size must be >= 1 and task_train_size >= 0")
        self.specs = dataset_specs(task, settings.options)
        self.extract = EXTRACTORS[settings.answer_format]
        default_prompt = SYSTEM_PROMPTS[settings.answer_format]
        self.system_prompt = default_prompt if settings.system_prompt is None else settings.system_prompt
        self.stop: list[str] | None = ["</answer>"] if settings.answer_format == "answer_tag" else None
        self.max_new_tokens = 256
        """Room for a few lines of working before the answer; SmolLM2-135M-Instruct's greedy completions of
        chain_sum take about 30 tokens, most sampled ones under 200 (the task's measurements)."""
        self._render = self._chat(tokenizer)
        self._rendered: dict[str, str] = {}  # question -> prompt
        self._entries: dict[str, tuple[int, dict]] = {}  # prompt -> (dataset index, entry)
        self.datasets: list[Any] = []  # per spec: the dataset whose score_answer scores its questions
        self._warned: set[str] = set()  # datasets already warned about (once each)

        t0 = time.monotonic()
        weights = [spec.weight for spec in self.specs]
        eval_counts = allocate(settings.eval_size, weights)
        train_counts = allocate(settings.train_size, weights) if settings.train_size else []
        self._eval: list[str] = []
        for i, spec in enumerate(self.specs):
            self.datasets.append(create(spec, eval_counts[i], _seed(EVAL_SEED, spec.name)))
            self._eval += self._add(i, self.datasets[i], range(eval_counts[i]), unique=True)
        held_out = set(self._eval)
        self._train: list[str] = []
        for i, count in enumerate(train_counts):
            self._train += self._pool(i, self.specs[i], count, held_out)
        self._eval_prompts = [self._rendered[q] for q in self._eval]
        self._train_prompts = [self._rendered[q] for q in self._train]
        seconds = time.monotonic() - t0
        log.info(
            "%s: %d held-out and %d training questions generated in %.1f s",
            task, len(self._eval), len(self._train), seconds,
        )  # fmt: skip

    # -- building ------------------------------------------------------------------------------------------
    def _chat(self, tokenizer):
        if tokenizer is None:
            raise ValueError(
                f"task {self.name}: its prompts are chats rendered with the model's chat template, which "
                "needs the model's tokenizer (trainer-client eval: give --model)"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"task {self.name}: the model {tokenizer.name_or_path} has no chat template, and "
                "reasoning-gym questions are instructions for a chat model; use an instruct model, or add a "
                "chat template (chat_template.jinja in the model folder)"
            )
        template = ChatTemplate(tokenizer, self.name, DataFields())
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

        def render(question: str) -> str:
            return template([*system, {"role": "user", "content": question}], self.name)

        return render

    def _add(self, index: int, dataset, indices, unique: bool, skip: set[str] = frozenset()) -> list[str]:
        """The questions of ``dataset`` at ``indices`` (rendered, registered for the reward), without those in
        ``skip`` and, if ``unique``, without repeats."""
        out, seen = [], set()
        for idx in indices:
            entry = dataset[idx]
            question = entry["question"]
            if question in skip or (unique and question in seen):
                continue
            seen.add(question)
            prompt = self._rendered.get(question)
            if prompt is None:
                prompt = self._rendered[question] = self._render(question)
                self._entries[prompt] = (index, entry)
            elif (first := self._entries[prompt][0]) != index and f"same:{index}" not in self._warned:
                self._warned.add(f"same:{index}")
                log.warning(
                    "%s: %s asks questions that %s asks too (%r); the first's verifier scores them",
                    self.name, self.specs[index].name, self.specs[first].name, question[:80],
                )  # fmt: skip
            out.append(question)
        return out

    def _pool(self, index: int, spec: DatasetSpec, count: int, held_out: set[str]) -> list[str]:
        """``count`` training questions of one dataset, none of them held out. Questions may repeat (as they
        do in the generator); when the held-out set took most of a small space, the few left are repeated to
        fill ``count``, so the mix keeps its weights, and a warning says so."""
        generated = 3 * count  # at most this many tries to find `count` questions that are not held out
        dataset = create(spec, generated, _seed(TRAIN_SEED, spec.name))
        pool: list[str] = []
        for start in range(0, generated, count):
            pool += self._add(index, dataset, range(start, start + count), unique=False, skip=held_out)
            if len(pool) >= count:
                break
        if not pool:
            raise ValueError(
                f"reasoning-gym:{spec.name}: every generated training question is a held-out one: the config "
                f"{spec.config} has too few distinct questions for task_eval_size {self.settings.eval_size}; "
                "widen the config or lower task_eval_size"
            )
        distinct = len(set(pool))
        if distinct < TINY_POOL:
            log.warning(
                "reasoning-gym:%s: only %d distinct training questions are left once the held-out ones are "
                "dropped; the policy may memorize them. Widen the config (task_options) or lower "
                "task_eval_size", spec.name, distinct,
            )  # fmt: skip
        return (pool * (count // len(pool) + 1))[:count]

    # -- the Task protocol ---------------------------------------------------------------------------------
    def train_prompts(self, step: int, n: int, seed: int) -> list[str]:
        """``n`` prompts for ``step``: epochs over the training pool, each a permutation seeded by
        ``(seed, epoch)`` (the order of ``cycle_prompts``, with each epoch's permutation made once)."""
        pool = self._train_prompts
        if not pool:
            raise ValueError(f"task {self.name} was built for evaluation only (task_train_size 0)")
        out = []
        for i in range(step * n, step * n + n):
            epoch, index = divmod(i, len(pool))
            out.append(pool[_permutation(seed, epoch, len(pool))[index]])
        return out

    def eval_prompts(self) -> list[str]:
        """The held-out prompts, dataset by dataset in generation order (the same for every run)."""
        return list(self._eval_prompts)

    def reward(self, prompt: str, completion: str) -> float:
        """The dataset's ``score_answer`` of the answer extracted from ``completion`` (0.0 when there is
        none); a verifier that raises on a malformed answer scores it 0.0."""
        found = self._entries.get(prompt)
        if found is None:
            raise ValueError(f"task {self.name}: a prompt it did not give: {prompt[:120]!r}")
        index, entry = found
        answer = self.extract(completion)
        if answer is None:
            return 0.0
        try:
            return float(self.datasets[index].score_answer(answer, entry))
        except Exception as e:  # the verifiers are written for well-formed answers
            name = self.specs[index].name
            if f"raised:{name}" not in self._warned:
                self._warned.add(f"raised:{name}")
                log.warning("reasoning-gym:%s: score_answer raised %s on %r; scores 0", name, e, answer[:80])
            return 0.0

    def row_fields(self, prompts: list[str]) -> dict[str, list]:
        """Beside the prompts, for reward functions: the right ``answer``, the ``question`` text, the
        ``dataset`` name and the entry's ``metadata`` of each prompt."""
        found = [self._entries[p] for p in prompts]
        return {
            "answer": [entry["answer"] for _, entry in found],
            "question": [entry["question"] for _, entry in found],
            "dataset": [self.specs[i].name for i, _ in found],
            "metadata": [entry.get("metadata") for _, entry in found],
        }

    def dataset_of(self, prompt: str) -> str:
        """The name of the dataset ``prompt`` comes from."""
        return self.specs[self._entries[prompt][0]].name


@lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, size: int) -> list[int]:
    order = list(range(size))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def load_reasoning_gym_task(task: str, tokenizer, settings: GymSettings | None = None) -> ReasoningGymTask:
    """``task: reasoning-gym:NAME[,NAME...]`` with the config's reasoning-gym keys (``settings``)."""
    return ReasoningGymTask(task, tokenizer, settings or GymSettings())
