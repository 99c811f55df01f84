"""GGUF files in (generator_server/gguf_model.py): conversion, the cache, the errors, the CLI, and one real
server started on a GGUF file.

The GGUF file is written here with the ``gguf`` package's writer: a tiny Llama (hidden 128, 2 layers, 4
heads of 32 with 2 key/value heads, tied embeddings) with the byte-level BPE tokenizer of
``generator_server/tiny_model.py``. Its float32 values are rounded to bfloat16 first, so every conversion,
bf16 or fp32, must give back exactly the values written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from generator_server import gguf_model
from generator_server.gguf_model import GGUFError, convert_gguf, is_gguf, resolve_model

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 128, 2, 4, 2, 256, 256
HEAD_DIM = HIDDEN // HEADS  # 32: vLLM's CPU attention needs head_dim >= 32
TEXT = "The cat sat on the mat. Hello world!"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k projections (rotary halves interleaved per head); the
    GGUF loader of transformers undoes it, so a file holds this and a converted folder the original."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def bf16_exact(rng: np.random.Generator, *shape: int, scale: float = 0.05, mean: float = 0.0) -> np.ndarray:
    """Random float32 values that bfloat16 represents exactly (so a bf16 folder holds them unchanged)."""
    values = torch.from_numpy(rng.normal(mean, scale, shape).astype(np.float32))
    return values.to(torch.bfloat16).to(torch.float32).numpy()


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF file (F32 tensors) to ``path``; returns the tensors a converted folder must
    hold, by their Hugging Face names (lm_head tied to the embedding, so not among them)."""
    import gguf

    from generator_server.tiny_model import (
        BOS,
        CHAT_TEMPLATE,
        EOS,
        PAD,
        UNK,
        bundled_corpus,
        train_bpe_tokenizer,
    )

    tokenizer = train_bpe_tokenizer(bundled_corpus(), 512)
    vocab = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    special = {tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD, UNK)}

    rng = np.random.default_rng(seed)
    expected = {
        "model.embed_tokens.weight": bf16_exact(rng, vocab, HIDDEN, scale=0.5),
        "model.norm.weight": bf16_exact(rng, HIDDEN, mean=1.0),
    }
    gguf_tensors = {
        "token_embd.weight": expected["model.embed_tokens.weight"],
        "output_norm.weight": expected["model.norm.weight"],
    }
    for i in range(LAYERS):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        layer = {
            "input_layernorm.weight": (bf16_exact(rng, HIDDEN, mean=1.0), "attn_norm.weight"),
            "self_attn.q_proj.weight": (bf16_exact(rng, HEADS * HEAD_DIM, HIDDEN), "attn_q.weight"),
            "self_attn.k_proj.weight": (bf16_exact(rng, KV_HEADS * HEAD_DIM, HIDDEN), "attn_k.weight"),
            "self_attn.v_proj.weight": (bf16_exact(rng, KV_HEADS * HEAD_DIM, HIDDEN), "attn_v.weight"),
            "self_attn.o_proj.weight": (bf16_exact(rng, HIDDEN, HEADS * HEAD_DIM), "attn_output.weight"),
            "post_attention_layernorm.weight": (bf16_exact(rng, HIDDEN, mean=1.0), "ffn_norm.weight"),
            "mlp.gate_proj.weight": (bf16_exact(rng, FFN, HIDDEN), "ffn_gate.weight"),
            "mlp.up_proj.weight": (bf16_exact(rng, FFN, HIDDEN), "ffn_up.weight"),
            "mlp.down_proj.weight": (bf16_exact(rng, HIDDEN, FFN), "ffn_down.weight"),
        }
        for name, (value, gguf_name) in layer.items():
            expected[hf + name] = value
            if gguf_name == "attn_q.weight":
                value = llama_cpp_permute(value, HEADS)
            elif gguf_name == "attn_k.weight":
                value = llama_cpp_permute(value, KV_HEADS)
            gguf_tensors[g + gguf_name] = value

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab)]
    )
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in gguf_tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """(path of the tiny GGUF file, the tensors its conversion must hold)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty ``$ONLINE_DPO_CACHE`` of this test's own, and no conversions remembered by this process."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ONLINE_DPO_CACHE", str(root))
    monkeypatch.setattr(gguf_model, "_RESOLVED", {})
    return root


def count_conversions(monkeypatch) -> list[Path]:
    """Record every ``convert_gguf`` that ``resolve_model`` starts (the real one still runs)."""
    calls: list[Path] = []
    real = gguf_model.convert_gguf

    def counted(file, out_dir, *args, **kwargs):
        calls.append(Path(out_dir))
        return real(file, out_dir, *args, **kwargs)

    monkeypatch.setattr(gguf_model, "convert_gguf", counted)
    return calls


def assert_holds(folder: Path, expected: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    saved = load_file(folder / "model.safetensors")
    assert set(saved) == set(expected)  # the tied head is not stored twice
    for name, value in expected.items():
        assert saved[name].dtype == dtype, name
        assert torch.equal(saved[name].float(), torch.from_numpy(value)), name


# --- conversion --------------------------------------------------------------------------------------------
def test_conversion_holds_the_written_tensors_and_a_working_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generator_server.tiny_model import CHAT_TEMPLATE, bundled_corpus, train_bpe_tokenizer

    file, expected = tiny_gguf
    out = convert_gguf(file, tmp_path / "out", dtype="float32")
    assert out == tmp_path / "out"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left beside it
    assert_holds(out, expected, torch.float32)  # q/k back in Hugging Face order, every value exact

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    source = json.loads((out / gguf_model.SOURCE_FILE).read_text())
    assert source == {"file": file.name, "sha256": gguf_model.file_sha256(file), "dtype": "float32"}

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert torch.equal(model.lm_head.weight, torch.from_numpy(expected["model.embed_tokens.weight"]))

    tokenizer = AutoTokenizer.from_pretrained(out)
    original = train_bpe_tokenizer(bundled_corpus(), 512)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == original(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("</s>", "<s>", "<pad>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(chat["input_ids"] if isinstance(chat, dict) else chat) == "user: hi\nassistant:"


def test_a_folder_written_meanwhile_by_another_process_is_kept(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def other_process_finishes_first(file, partial, dtype):
        (partial / "config.json").write_text("ours")
        out.mkdir()
        (out / "config.json").write_text("theirs")

    monkeypatch.setattr(gguf_model, "_write_folder", other_process_finishes_first)
    assert convert_gguf(tiny_gguf[0], out) == out
    assert (out / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # ours dropped


def test_a_failed_conversion_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    def crash(file, partial, dtype):
        (partial / "model.safetensors").write_bytes(b"half")
        raise MemoryError("killed half-way")

    monkeypatch.setattr(gguf_model, "_write_folder", crash)
    with pytest.raises(MemoryError):
        convert_gguf(tiny_gguf[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_folder_is_refused(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(GGUFError, match="already exists"):
        convert_gguf(tiny_gguf[0], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- the cache ---------------------------------------------------------------------------------------------
def test_resolve_model_converts_once_and_keys_by_content(tiny_gguf, cache, tmp_path, monkeypatch):
    file, expected = tiny_gguf
    conversions = count_conversions(monkeypatch)
    folder = Path(resolve_model(str(file)))
    digest = gguf_model.file_sha256(file)
    assert folder == cache / "gguf" / f"{digest[:16]}-{file.stem}"
    assert_holds(folder, expected, torch.bfloat16)  # the cache holds bf16
    assert len(conversions) == 1

    monkeypatch.setattr(gguf_model, "_RESOLVED", {})  # as a new process would: found on disk, by content
    assert resolve_model(str(file)) == str(folder)
    elsewhere = tmp_path / "copy" / file.name
    elsewhere.parent.mkdir()
    shutil.copy(file, elsewhere)
    assert resolve_model(str(elsewhere)) == str(folder)
    assert len(conversions) == 1

    other = tmp_path / "other" / file.name  # same name, other weights: another folder
    other.parent.mkdir()
    write_tiny_gguf(other, seed=1)
    assert resolve_model(str(other)) != str(folder)
    assert len(conversions) == 2
    assert sorted(p.name for p in (cache / "gguf").iterdir() if not p.name.startswith(".")) == sorted(
        [folder.name, Path(resolve_model(str(other))).name]
    )


def test_anything_but_a_gguf_file_is_returned_unchanged(tmp_path):
    (tmp_path / "folder.gguf").mkdir()  # a model folder that happens to be named so
    for path in ["models/tiny", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "folder.gguf")]:
        assert not is_gguf(path)
        assert resolve_model(path) == path
    assert is_gguf("x/model.Q4_K_M.gguf") and is_gguf("MODEL.GGUF")


def test_the_server_settings_name_the_converted_folder(tiny_gguf, cache):
    from generator_server.cli import parse_settings, with_gguf_converted

    file = str(tiny_gguf[0])
    settings = with_gguf_converted(parse_settings(["--model", file]))
    assert settings.model == resolve_model(file) and Path(settings.model, "config.json").is_file()
    assert settings.served_model_name == file  # what /v1 clients send as 'model' stays the file
    named = with_gguf_converted(parse_settings(["--model", file, "--served-model-name", "tiny"]))
    assert named.served_model_name == "tiny"


# --- errors ------------------------------------------------------------------------------------------------
def test_an_architecture_transformers_cannot_read_is_named(tmp_path, cache):
    import gguf

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "bogusarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_model.gguf_architecture(path) == "bogusarch"
    with pytest.raises(GGUFError, match="'bogusarch'") as e:
        resolve_model(str(path))
    assert "supports only some architectures" in str(e.value) and "llama" in str(e.value)
    assert not (cache / "gguf").exists() or not [p for p in (cache / "gguf").iterdir() if p.is_dir()]


def test_a_missing_file_and_missing_packages_say_what_to_do(tiny_gguf, tmp_path, monkeypatch):
    with pytest.raises(GGUFError, match="not found: check the path"):
        resolve_model(str(tmp_path / "nowhere.gguf"))
    real_find_spec = gguf_model.importlib.util.find_spec
    monkeypatch.setattr(
        gguf_model.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name)
    )
    with pytest.raises(GGUFError, match=r"gguf: pip install 'online-dpo-server\[gguf\]'"):
        convert_gguf(tiny_gguf[0], tmp_path / "out")
    with pytest.raises(GGUFError, match="dtype 'int8'"):
        convert_gguf(tiny_gguf[0], tmp_path / "out", dtype="int8")


# --- the trainer -------------------------------------------------------------------------------------------
def test_the_learner_trains_from_a_gguf_file(tiny_gguf, cache):
    from trainer_client.config import TrainConfig
    from trainer_client.learner import Learner

    file, expected = tiny_gguf
    learner = Learner(TrainConfig(model=str(file), ref_model=str(file)))
    embedding = torch.from_numpy(expected["model.embed_tokens.weight"])
    for model in (learner.policy, learner.reference):
        assert torch.equal(model.get_input_embeddings().weight.float(), embedding)
    assert learner.tokenizer.chat_template and learner.tokenizer.eos_token == "</s>"
    specs = learner.tensor_specs()  # the tied head shares the embedding's storage, as the server expects
    assert specs["lm_head.weight"][1] == specs["model.embed_tokens.weight"][1]


def test_the_colocated_engine_starts_from_the_converted_folder(tiny_gguf, cache, monkeypatch):
    from trainer_client.colocate import ColocatedEngine, EngineSettings

    monkeypatch.setattr(ColocatedEngine, "_build", lambda self: None)  # (no vLLM: only what it would read)
    file = str(tiny_gguf[0])
    engine = ColocatedEngine(EngineSettings(model=file))
    assert engine.settings.model == resolve_model(file)
    embedding = tiny_gguf[1]["model.embed_tokens.weight"]
    assert engine.spec["model.embed_tokens.weight"] == (list(embedding.shape), "bfloat16")


# --- trainer-client convert-gguf ---------------------------------------------------------------------------
def test_cli_convert_gguf(tiny_gguf, cache, tmp_path, capsys):
    from trainer_client.cli import main

    file, expected = tiny_gguf
    out = tmp_path / "converted"
    assert main(["convert-gguf", str(file), "--out", str(out), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_holds(out, expected, torch.float32)

    assert main(["convert-gguf", str(file)]) == 0  # into the cache: the folder training and serving use
    printed = capsys.readouterr().out.strip()
    assert printed == resolve_model(str(file)) and Path(printed).is_relative_to(cache)

    assert main(["convert-gguf", str(tmp_path / "missing.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing.gguf")]) == 2  # eval takes GGUF files too
    assert "error: --model: GGUF file" in capsys.readouterr().err


# --- a real server on a GGUF file --------------------------------------------------------------------------
@pytest.mark.slow  # starts a server of its own (about a minute on 2 CPU cores)
def test_the_server_serves_a_gguf_file(tiny_gguf, tmp_path):
    import httpx
    from conftest import REFERENCE_LOGPROB_TOLERANCE, max_logprob_diff_to_trainer
    from server_process import running_server

    from trainer_client.client import GeneratorClient

    file = tiny_gguf[0]
    env = {"ONLINE_DPO_CACHE": str(tmp_path / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with running_server(file, "--max-model-len", "128", "--max-num-seqs", "4", env=env) as server:
        folder = next((tmp_path / "cache" / "gguf").glob(f"*-{file.stem}"))
        log = server.log_path.read_text()
        assert f"serving the GGUF file {file}, converted into {folder}" in log
        assert httpx.get(f"{server.url}/health", timeout=10).json()["model"] == str(folder)
        with GeneratorClient(server.url, timeout=120) as client:
            out = client.generate(
                prompts=["The cat sat"], max_tokens=8, temperature=0.0, logprobs=True, ignore_eos=True
            )
        completion = out.results[0].completions[0]
        assert len(completion.token_ids) == 8
        # the served model is the converted folder: transformers on it gives the same log-probabilities
        samples = [(out.results[0].prompt_token_ids, completion)]
        assert max_logprob_diff_to_trainer(folder, samples) <= REFERENCE_LOGPROB_TOLERANCE
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [str(file)]
    assert os.listdir(tmp_path / "cache" / "gguf")  # (the cache stays for the next start)
