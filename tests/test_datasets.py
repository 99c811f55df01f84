"""Tasks from data: Parquet, CSV, JSON and JSONL files and folders through ``datasets``, named columns,
held-out splits, and chat rows rendered with the policy tokenizer's chat template (no server)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chat_model import with_chat_template
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from trainer_client.rewards import build_reward
from trainer_client.tasks import DataFields, load_task

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir, tmp_path_factory):
    return AutoTokenizer.from_pretrained(
        with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("m") / "c")
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_parquet_with_named_columns_chat_and_text_rows(tmp_path, chat_tokenizer):
    rows = [{"question": f"{i}+{i}=", "solution": str(2 * i), "chat": None} for i in range(9)]
    rows.append({"question": None, "solution": "4", "chat": CHAT})  # one chat row, held out (the last tenth)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sums.parquet")
    fields = DataFields(prompt="question", messages="chat", answer="solution")
    task = load_task(str(tmp_path / "sums.parquet"), fields, tokenizer=chat_tokenizer)

    rendered = "<|system|>Be brief.\n<|user|>What is 2+2?\n<|assistant|>"
    assert rendered == chat_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert task.name == "sums" and task.eval_prompts() == [rendered]
    train = {p for step in range(6) for p in task.train_prompts(step, 3, seed=0)}
    assert train == {f"{i}+{i}=" for i in range(9)}  # 18 draws cover the 9 training rows, none held out
    assert task.reward("3+3=", " 6\n...") == 1.0 and task.reward(rendered, "5") == 0.0
    assert task.row_fields(["1+1=", rendered]) == {
        "question": ["1+1=", None],
        "solution": ["2", "4"],
        "chat": [None, CHAT],
    }
    assert build_reward("task", task)(["3+3=", rendered], ["6", "4"]) == [1.0, 1.0]


def test_folder_of_csv_files_with_an_eval_split(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "train.csv").write_text("prompt,answer\nred?,1\ngreen?,2\n")
    (folder / "test.csv").write_text("prompt,answer\nblue?,3\n")
    task = load_task(str(folder), DataFields(eval_split="test"))
    assert task.eval_prompts() == ["blue?"] and sorted(task.train_prompts(0, 2, seed=0)) == ["green?", "red?"]
    assert task.reward("blue?", "3") == 1.0  # CSV reads the answer as a number; it is compared as text
    with pytest.raises(ValueError, match=r"eval_split 'validation'.*\['train', 'test'\]"):
        load_task(str(folder), DataFields(eval_split="validation"))


def test_json_array_file_and_eval_fraction(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": f"p{i}"} for i in range(8)]))
    task = load_task(str(tmp_path / "p.json"), DataFields(eval_fraction=0.25))
    assert task.eval_prompts() == ["p6", "p7"]
    assert load_task(str(tmp_path / "p.json"), DataFields(eval_fraction=0)).eval_prompts() == [
        f"p{i}" for i in range(8)
    ]  # nothing held out: evaluated on the training rows


def test_bad_rows_and_sources_are_named(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"t\.jsonl:2: needs a non-empty string 'prompt' or .* 'messages'"):
        load_task(path)
    pq.write_table(pa.Table.from_pylist([{"q": "a"}, {"q": None}]), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: split 'train' row index 1: needs .*'q'"):
        load_task(str(tmp_path / "t.parquet"), DataFields(prompt="q"))
    bad_chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"content": "no role"}]}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: 'messages' must be a non-empty list"):
        load_task(bad_chat, tokenizer=chat_tokenizer)
    (tmp_path / "t.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown format"):
        load_task(str(tmp_path / "t.txt"))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_task(str(tmp_path / "missing.parquet"))
    with pytest.raises(ValueError, match="no splits"):
        load_task(path, DataFields(eval_split="test"))


def test_chat_rows_need_a_model_with_a_chat_template(tmp_path, tiny_model_dir):
    no_template = AutoTokenizer.from_pretrained(with_chat_template(tiny_model_dir, tmp_path / "m", None))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(ValueError, match=r"chat\.jsonl: rows hold chat messages .* has no chat template"):
        load_task(path, tokenizer=no_template)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load_task(path)


def test_a_template_bos_is_not_doubled_by_a_tokenizer_that_adds_one(tmp_path, tiny_model_dir):
    """The server tokenizes a text prompt with special tokens; with a tokenizer that adds BOS itself the
    rendered prompt must not carry the template's BOS too, or the model would see two."""
    model = with_chat_template(
        tiny_model_dir, tmp_path / "m", "{{ bos_token }}" + "[{{ messages[0].content }}]"
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer("a")["input_ids"][0] == bos
    task = load_task(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:]}]), tokenizer=tokenizer)
    [prompt] = task.eval_prompts()
    assert prompt == "[What is 2+2?]"
    chat_ids = tokenizer.apply_chat_template(CHAT[1:], add_generation_prompt=True, return_dict=False)
    assert tokenizer(prompt)["input_ids"] == chat_ids  # what the server's chat endpoint would feed the model
