"""Two-digit addition with an exact-match reward: the built-in task of the demo.

A prompt is ``"37+45="`` and the right completion is ``"82"`` followed by end-of-sequence. The reward is
1.0 when the completion, stripped of whitespace, is exactly the sum and 0.0 otherwise, so it is exact,
cheap and needs no reward model (the same kind of reward as GSM8K exact match in "Asynchronous RLHF").

All 8100 problems with operands 10..99 are split once, from ``split_seed``, into a held-out set (never
trained on, used by ``trainer-client eval``) and a training set. ``train_prompts(step, n, seed)`` draws a
deterministic batch from the training set, so a resumed run sees the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# The characters a prompt or an answer can contain; the demo's tokenizer has one token per character.
ALPHABET = "0123456789+="


def parse_operands(prompt: str) -> tuple[int, int]:
    """``"37+45="`` -> ``(37, 45)``."""
    left, right = prompt.rstrip("=").split("+")
    return int(left), int(right)


def answer(prompt: str) -> str:
    """The exact completion that earns reward 1.0 for ``prompt``."""
    a, b = parse_operands(prompt)
    return str(a + b)


def exact_match_reward(prompt: str, completion: str) -> float:
    """1.0 if the completion is exactly the sum (surrounding whitespace ignored), else 0.0."""
    return float(completion.strip() == answer(prompt))


@dataclass
class ArithmeticTask:
    """Addition of two two-digit numbers; reward = exact match of the sum."""

    split_seed: int = 0
    """Seed of the train / held-out split (fixed, so every run seed is evaluated on the same prompts)."""
    num_eval: int = 500
    """Size of the held-out set."""
    low: int = 10
    high: int = 99
    """Operands are drawn from ``low..high`` inclusive."""
    name: str = "arithmetic"
    max_new_tokens: int = 4
    """Hint for the trainer: a sum has at most 3 digits, then end-of-sequence."""
    stop: list[str] | None = None
    _train: list[str] = field(init=False, repr=False)
    _eval: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        operands = range(self.low, self.high + 1)
        problems = [f"{a}+{b}=" for a in operands for b in operands]
        random.Random(self.split_seed).shuffle(problems)
        self._eval = sorted(problems[: self.num_eval])
        self._train = sorted(problems[self.num_eval :])

    # -- prompts -----------------------------------------------------------------------------------------
    def train_split(self) -> list[str]:
        return list(self._train)

    def eval_prompts(self) -> list[str]:
        """The held-out prompts, in a fixed order."""
        return list(self._eval)

    def train_prompts(self, step: int, n: int, seed: int = 0) -> list[str]:
        """``n`` training prompts for ``step``, a pure function of ``(seed, step)``."""
        rng = random.Random(f"{self.name}:{seed}:{step}")
        return rng.sample(self._train, n) if n <= len(self._train) else rng.choices(self._train, k=n)

    # -- reward ------------------------------------------------------------------------------------------
    def reward(self, prompt: str, completion: str) -> float:
        return exact_match_reward(prompt, completion)

    def rewards(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [exact_match_reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    def row_fields(self, prompts: list[str]) -> dict[str, list]:
        """The right sum of each prompt, as ``answer``, for reward functions."""
        return {"answer": [answer(p) for p in prompts]}

    @staticmethod
    def target(prompt: str) -> str:
        """The supervised target for the starter's warm-up."""
        return answer(prompt)
