"""``trainer-client eval``: greedy held-out reward of a model, measured through the generation server.

    trainer-client eval --model DIR --task arithmetic                          # starts a server itself
    trainer-client eval --task arithmetic --server-url http://127.0.0.1:8000  # whatever it serves now
    trainer-client eval --model DIR --colocate [--device cuda]                # vLLM in this process

Every held-out prompt of the task goes to ``POST /generate`` in one batch with temperature 0 (greedy);
each completion is scored with the task's reward. For a 0/1 reward such as exact match, the mean reward
is the accuracy. With ``--colocate`` the same request goes to a vLLM engine built in this process (the
colocated mode's engine), so no server is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from generator_server.gguf_model import GGUFError, is_gguf, resolve_model
from trainer_client.client import GeneratorClient, GeneratorError
from trainer_client.tasks import TASKS, load_task, task_hint


@dataclass
class EvalResult:
    task: str
    prompts: int
    mean_reward: float
    """Mean task reward of the greedy completions (= accuracy for an exact-match reward)."""
    finished: float
    """Fraction of completions that ended with end-of-sequence (or a stop string) before the length limit."""
    weights_version: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


EVAL_REQUEST_PROMPTS = 1024
"""Held-out prompts per generate request (the server's --max-prompts defaults to 4096)."""


def evaluate(client, task, max_new_tokens: int | None = None) -> EvalResult:
    """Greedy completions of all of ``task.eval_prompts()``, scored by ``task.reward``. ``client`` is a
    :class:`GeneratorClient` or a colocated engine: anything with the server's ``generate``."""
    prompts = task.eval_prompts()
    t0 = time.monotonic()
    completions, versions = [], set()
    for i in range(0, len(prompts), EVAL_REQUEST_PROMPTS):  # the server refuses huge requests (413)
        out = client.generate(
            prompts=prompts[i : i + EVAL_REQUEST_PROMPTS],
            n=1,
            temperature=0.0,
            max_tokens=max_new_tokens or task_hint(task, "max_new_tokens") or 64,
            stop=task_hint(task, "stop"),
        )
        completions += [r.completions[0] for r in out.results]
        versions.add(out.weights_version)
    if len(versions) > 1:
        raise RuntimeError(f"the served weights changed during the evaluation (versions {sorted(versions)})")
    rewards = [float(task.reward(p, c.text)) for p, c in zip(prompts, completions, strict=True)]
    return EvalResult(
        task=task.name,
        prompts=len(prompts),
        mean_reward=sum(rewards) / len(rewards),
        finished=sum(c.finish_reason == "stop" for c in completions) / len(completions),
        weights_version=versions.pop(),
        seconds=round(time.monotonic() - t0, 3),
    )


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table; ``columns`` are ``(key, header)``; floats get 3 decimals."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    rows_text = ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join([line, rule, *rows_text])


EVAL_COLUMNS = [
    ("model", "model"),
    ("task", "task"),
    ("prompts", "prompts"),
    ("mean_reward", "held-out reward (greedy)"),
    ("finished", "finished"),
    ("weights_version", "version"),
]


# --- command line --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="model folder or GGUF file; without --server-url a server is started for it"
    )
    parser.add_argument(
        "--task", default="arithmetic",
        help="built-in task name, reasoning-gym:NAME[,NAME...], data file or folder (train's `task`)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"a reasoning-gym task's key of the train config ({', '.join(EVAL_TASK_KEYS)}; value parsed as "
        "YAML), so the held-out questions are the run's; repeatable",
    )  # fmt: skip
    parser.add_argument("--server-url", help="evaluate what this running server serves now")
    parser.add_argument(
        "--api-key", default=os.environ.get("GENERATOR_API_KEY"),
        help="the server's API key, if it has one (default: $GENERATOR_API_KEY)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's hint, else 64")
    parser.add_argument("--server-log", help="log file of the server started here (default: discarded)")
    parser.add_argument(
        "--colocate", action="store_true", help="build the vLLM engine in this process instead of a server"
    )
    parser.add_argument("--device", default="cpu", help="--colocate: cpu or cuda (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


EVAL_TASK_KEYS = ("task_options", "task_eval_size", "answer_format", "system_prompt")
"""The train config's keys that choose a reasoning-gym task's held-out prompts and reward."""


def _gym_settings(args: argparse.Namespace):
    """The reasoning-gym keys given with ``--set``, checked as the train config checks them, as the task's
    settings without a training pool (an evaluation needs none)."""
    from trainer_client.config import ConfigError, load_config, parse_override
    from trainer_client.tasks import GymSettings

    for item in args.overrides:
        key = parse_override(item)[0]
        if key not in EVAL_TASK_KEYS:
            raise ConfigError(f"--set {item}: eval takes only {', '.join(EVAL_TASK_KEYS)}")
    if not args.overrides:
        return GymSettings(train_size=0)
    config = load_config(None, args.overrides, base={"model": args.model or "-", "task": args.task})
    return GymSettings.of_config(config, train_size=0)


class _CannotStart(Exception):
    """The engine or server to evaluate with could not be started."""


def _evaluate_as_asked(args: argparse.Namespace, task) -> tuple[EvalResult, str]:
    """Evaluate with a colocated engine, a running server or a server started here; ``(result, label)``."""
    if args.colocate:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the result only
        from trainer_client.colocate import ColocatedEngine, ColocateError, EngineSettings

        try:
            engine = ColocatedEngine(EngineSettings(model=args.model, device=args.device))
        except ColocateError as e:
            raise _CannotStart(str(e)) from e
        try:
            return evaluate(engine, task, args.max_new_tokens), args.model
        finally:
            engine.close()
    if args.server_url:
        with GeneratorClient(args.server_url, api_key=args.api_key) as client:
            return evaluate(client, task, args.max_new_tokens), args.model or client.health().model
    from trainer_client.local_server import ServerStartError, local_server

    try:
        with local_server(args.model, log_path=args.server_log) as url, GeneratorClient(url) as client:
            return evaluate(client, task, args.max_new_tokens), args.model
    except ServerStartError as e:
        raise _CannotStart(str(e)) from e


def _tokenizer(args: argparse.Namespace):
    """The model's tokenizer, which renders a dataset's chat rows with its chat template."""
    if not args.model or args.task in TASKS:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.model)


def run(args: argparse.Namespace) -> int:
    """Greedy held-out accuracy / mean reward of a model, as a table (or JSON)."""
    if not args.model and not args.server_url:
        print("error: give --model DIR (a server is started for it) or --server-url URL", file=sys.stderr)
        return 2
    if args.colocate and args.server_url:
        print("error: --colocate evaluates --model DIR in this process: drop --server-url", file=sys.stderr)
        return 2
    given_model = args.model
    if args.model and is_gguf(args.model):  # its converted folder (cached) from here on, for all three ways
        try:
            args = argparse.Namespace(**{**vars(args), "model": resolve_model(args.model)})
        except GGUFError as e:
            print(f"error: --model: {e}", file=sys.stderr)
            return 2
    try:
        task = load_task(args.task, tokenizer=_tokenizer(args), gym=_gym_settings(args))
    except (ValueError, FileNotFoundError) as e:  # (ConfigError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result, label = _evaluate_as_asked(args, task)
    except _CannotStart as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except GeneratorError as e:
        print(f"error: generation server: {e}", file=sys.stderr)
        return 3
    row = {"model": given_model or label, **result.as_dict()}
    print(json.dumps(row) if args.json else format_table([row], EVAL_COLUMNS))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer-client eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
