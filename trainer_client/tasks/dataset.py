"""Tasks made of rows of data: a JSONL, JSON, Parquet or CSV file, a folder of them, or a Hub dataset.

A row gives its prompt as text (the ``prompt`` column) or as a chat (the ``messages`` column: a list of
``{"role": ..., "content": ...}``), which is rendered with the policy tokenizer's chat template exactly as
the generation server renders ``/v1/chat/completions``. An ``answer`` column gives an exact-match reward.
The column names are the config's ``prompt_field``, ``messages_field`` and ``answer_field``.

JSONL files are read here (no dependency); everything else goes through the ``datasets`` library, imported
only then.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer_client")

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffix -> the ``datasets`` builder that reads it."""
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")
"""``owner/name`` or ``owner/name:config`` of a dataset on the Hugging Face Hub."""


@dataclass(frozen=True)
class DataFields:
    """Which columns hold what, and which rows are held out (the config's keys of the same names)."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"
    eval_split: str | None = None
    eval_fraction: float = 0.1


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


class ChatTemplate:
    """Renders a list of messages to the prompt text the policy continues, with the tokenizer's chat
    template (``add_generation_prompt=True``), as the server's ``/v1/chat/completions`` does.

    The server tokenizes a text prompt with the tokenizer's special tokens; where that adds a BOS token and
    the template already wrote one, the template's is dropped, so the prompt gets one BOS, as in chat."""

    def __init__(self, tokenizer, where: str, fields: DataFields):
        if tokenizer is None:
            raise ValueError(
                f"{where}: rows hold chat messages; rendering them needs the model's tokenizer "
                "(trainer-client eval: give --model)"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{where}: rows hold chat messages ({fields.messages!r}) but the model "
                f"{tokenizer.name_or_path} has no chat template; use a model whose tokenizer has one "
                f"('chat_template' in tokenizer_config.json, or chat_template.jinja), or give the prompts as "
                f"text in {fields.prompt!r}"
            )
        self.tokenizer = tokenizer
        bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
        adds_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
        self.drop_prefix = bos if adds_bos and bos else None

    def __call__(self, messages: list[dict], where: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may raise on purpose (e.g. "roles must alternate")
            raise ValueError(f"{where}: the chat template cannot render these messages: {e}") from e
        if self.drop_prefix and text.startswith(self.drop_prefix):
            text = text[len(self.drop_prefix) :]
        return text


def _check_messages(messages: Any, where: str, field: str) -> list[dict]:
    ok = isinstance(messages, list) and messages
    ok = ok and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
    )
    if not ok:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of {{'role': str, 'content': ...}}")
    return messages


class RowsTask:
    """Prompts from rows of data, each a text prompt or a chat, with an optional answer.

    ``rows`` (and ``eval_rows``) are ``(label, row)`` pairs; a label says where a row came from, for errors.
    Held-out rows: ``eval_rows`` if given (the dataset's ``eval_split``); else the rows whose ``"split"``
    column is ``"eval"``; else the last ``eval_fraction`` of the rows (rounded down); when that is none, the
    training rows themselves. The reward is exact match against the answer: 1.0 when the completion,
    stripped and cut at its first newline, equals it, else 0.0. A row without an answer has no programmatic
    reward. Reward functions get every column of a prompt's row (``row_fields``)."""

    def __init__(
        self,
        name: str,
        rows: list[tuple[str, dict]],
        fields: DataFields = DataFields(),
        tokenizer=None,
        eval_rows: list[tuple[str, dict]] | None = None,
        where: str | None = None,
    ):
        self.name, self.fields = name, fields
        self.stop: list[str] | None = None
        self.max_new_tokens: int | None = None
        where = where or name
        if not rows:
            raise ValueError(f"{where}: no rows")
        for at, row in rows + (eval_rows or []):
            if not isinstance(row, dict):
                raise ValueError(f"{at}: a row must be an object of named fields")
        if eval_rows is None:
            eval_rows = [(at, r) for at, r in rows if r.get("split") == "eval"]
            if eval_rows:
                rows = [(at, r) for at, r in rows if r.get("split") != "eval"]
            else:
                held_out = int(len(rows) * fields.eval_fraction + 1e-9)
                rows, eval_rows = (rows[:-held_out], rows[-held_out:]) if held_out else (rows, [])
        chat = None
        self.rows: dict[str, dict] = {}  # prompt -> its row (the first, for a repeated prompt)
        self.columns: list[str] = []
        pools: tuple[list[str], list[str]] = ([], [])  # (train, eval) prompts
        conflicts = 0
        for pool, split_rows in zip(pools, (rows, eval_rows), strict=True):
            for at, row in split_rows:
                if row.get(fields.messages) is not None:
                    chat = chat or ChatTemplate(tokenizer, where, fields)
                    prompt = chat(_check_messages(row[fields.messages], at, fields.messages), at)
                elif isinstance(row.get(fields.prompt), str) and row[fields.prompt]:
                    prompt = row[fields.prompt]
                else:
                    raise ValueError(
                        f"{at}: needs a non-empty string {fields.prompt!r} or a list of chat messages "
                        f"{fields.messages!r} (set prompt_field / messages_field to the dataset's columns)"
                    )
                pool.append(prompt)
                known = self.rows.setdefault(prompt, row)
                conflicts += known is not row and known.get(fields.answer) != row.get(fields.answer)
                self.columns += [k for k in row if k not in self.columns]
        if conflicts:
            log.warning("%s: %d repeated prompts have other answers; the first's is used", where, conflicts)
        self._train = pools[0] or pools[1]
        self._eval = pools[1] or pools[0]

    @property
    def has_answers(self) -> bool:
        return any(row.get(self.fields.answer) is not None for row in self.rows.values())

    def train_prompts(self, step: int, n: int, seed: int) -> list[str]:
        return cycle_prompts(self._train, step, n, seed)

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def reward(self, prompt: str, completion: str) -> float:
        answer = self.rows[prompt].get(self.fields.answer) if prompt in self.rows else None
        if answer is None:
            raise ValueError(
                f"task {self.name!r}: prompt has no {self.fields.answer!r}, so it has no programmatic "
                "reward; set `reward` to a reward function, a reward model folder or `length`"
            )
        lines = completion.strip().splitlines()
        return float(bool(lines) and lines[0].strip() == str(answer).strip())

    def row_fields(self, prompts: list[str]) -> dict[str, list]:
        """Every column of the rows of ``prompts``, as lists aligned with ``prompts``."""
        rows = [self.rows[p] for p in prompts]
        return {column: [row.get(column) for row in rows] for column in self.columns}


# --- loading -----------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """The rows of a JSONL file, each labelled ``path:line``."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


class JsonlTask(RowsTask):
    """The rows of one JSONL file, read without the ``datasets`` library; errors name the file's line."""

    def __init__(self, path: str | Path, fields: DataFields = DataFields(), tokenizer=None):
        path = Path(path)
        if fields.eval_split is not None:
            raise ValueError(
                f"eval_split {fields.eval_split!r}: {path} is one file with no splits; mark held-out rows "
                'with "split": "eval", or give a folder of files named by split (train.jsonl, test.jsonl)'
            )
        super().__init__(path.stem, read_jsonl(path), fields, tokenizer, where=str(path))


def _datasets(what: str):
    try:
        import datasets
    except ModuleNotFoundError:
        raise ValueError(
            f"task {what}: reading it needs the `datasets` package: pip install datasets"
        ) from None
    datasets.disable_progress_bars()
    return datasets


def load_dataset_task(source: str, fields: DataFields = DataFields(), tokenizer=None) -> RowsTask:
    """A task from a data file or folder (JSONL files are read without ``datasets``), or from a Hub dataset
    ``owner/name[:config]`` when ``source`` is no local path."""
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        return JsonlTask(path, fields, tokenizer)
    if path.is_file() or path.is_dir():
        if path.is_file() and path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"task file {path}: unknown format; expected one of {sorted(DATA_SUFFIXES)}")
        datasets = _datasets(str(path))
        args = (DATA_SUFFIXES[path.suffix],) if path.is_file() else (str(path),)
        kwargs = {"data_files": str(path)} if path.is_file() else {}
        name = path.stem if path.is_file() else path.name
    elif path.suffix in DATA_SUFFIXES:
        raise FileNotFoundError(f"task file {path} does not exist")
    else:
        datasets = _datasets(source)
        repo, _, config = source.partition(":")
        args, kwargs, name = (repo, config or None), {}, repo.rsplit("/", 1)[-1]
    try:
        splits = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # the library's own errors: unreadable files, no network, unknown dataset
        hub = "" if path.exists() else " (no such local file or folder, so it was looked up on the Hub)"
        raise ValueError(f"task {source}: the datasets library cannot load it{hub}: {e}") from e
    names = list(splits)
    train = "train" if "train" in splits else names[0] if len(names) == 1 else None
    if train is None:
        raise ValueError(f"task {source}: no 'train' split among {names}")
    eval_rows = None
    if fields.eval_split is not None:
        if fields.eval_split not in splits:
            raise ValueError(f"eval_split {fields.eval_split!r}: task {source} has the splits {names}")
        eval_rows = labelled(source, fields.eval_split, splits[fields.eval_split])
    rows = labelled(source, train, splits[train])
    return RowsTask(name, rows, fields, tokenizer, eval_rows, where=source)


def labelled(source: str, split: str, dataset) -> list[tuple[str, dict]]:
    return [(f"{source}: split {split!r} row index {i}", row) for i, row in enumerate(dataset.to_list())]
