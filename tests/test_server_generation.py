"""What the server generates, checked against transformers running the same weights in fp32.

Each test pushes the weights it needs as a new version, so the order of tests does not matter."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import REFERENCE_LOGPROB_TOLERANCE
from safetensors.torch import load_file, save_file

PROMPTS = ["The cat sat on", "Once upon a time", "Hello"]
MAX_ABS_LOGPROB_DIFF = REFERENCE_LOGPROB_TOLERANCE


# --- transformers reference -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """``reference(weights_path)``: the tiny model in transformers (fp32, eager attention), those weights."""
    from transformers import AutoModelForCausalLM

    # One thread: next to a running vLLM server, two OpenMP threads on two cores were 40x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def load(weights_path):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
        )
        state = {k: v.to(torch.float32) for k, v in load_file(weights_path).items()}
        model.load_state_dict(state, strict=True)
        return model.eval()

    yield load
    torch.set_num_threads(threads)


@torch.no_grad()
def reference_greedy(model, prompt_ids: list[int], n_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


@torch.no_grad()
def reference_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log_softmax of the raw logits at each completion position, for the completion's tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]  # (T, vocab): position t predicts token t
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def push_new(server, path) -> int:
    version = server.weights_version() + 1
    response = server.push(path, version)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["weights_version"] == version and body["bytes"] == path.stat().st_size
    assert body["load_seconds"] > 0
    return version


def generate(client, **body) -> dict:
    response = client.post("/generate", json={"prompts": PROMPTS, **body})
    assert response.status_code == 200, response.text
    return response.json()


# --- sampling ---------------------------------------------------------------------------------------
def test_n_completions_per_prompt_in_request_order(client):
    body = generate(client, n=4, max_tokens=8, temperature=1.0, seed=1)
    assert len(body["results"]) == len(PROMPTS)
    lengths = {len(r["prompt_token_ids"]) for r in body["results"]}
    assert len(lengths) > 1  # the prompts differ in length: results are in request order, not shuffled
    single = [generate(client, prompts=[p], max_tokens=1)["results"][0] for p in PROMPTS]
    for result, alone in zip(body["results"], single, strict=True):
        assert result["prompt_token_ids"] == alone["prompt_token_ids"]
        assert len(result["completions"]) == 4
        assert len({tuple(c["token_ids"]) for c in result["completions"]}) > 1  # n samples, not n copies


def test_same_seed_same_completions(client):
    request = dict(n=2, max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    first, second = generate(client, **request), generate(client, **request)
    assert first.pop("timing")["generate_seconds"] > 0 and second.pop("timing")["generate_seconds"] > 0
    assert first == second  # everything but the timing
    other = generate(client, **{**request, "seed": 4321})
    assert other["results"] != first["results"]
    # Within a batch prompt i samples with seed + i: equal prompts still get independent completions.
    twins = generate(client, prompts=["Hello", "Hello"], max_tokens=12, seed=5)["results"]
    assert twins[0]["completions"] != twins[1]["completions"]


def test_stop_strings_min_tokens_and_ignore_eos(client):
    full = generate(client, prompts=["Once"], max_tokens=20, temperature=0, ignore_eos=True)
    text = full["results"][0]["completions"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        stopped = generate(
            client, prompts=["Once"], max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]
        )
        completion = stopped["results"][0]["completions"][0]
        assert completion["finish_reason"] == "stop" and stop not in completion["text"]
        assert text.startswith(completion["text"])
    body = generate(client, max_tokens=6, min_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    assert all(len(c["token_ids"]) == 6 for r in body["results"] for c in r["completions"])


# --- agreement with transformers --------------------------------------------------------------------
def test_logprobs_are_raw_and_match_transformers(server, client, make_weights, reference):
    weights = make_weights(seed=21)
    push_new(server, weights)
    model = reference(weights)
    # Sampled with temperature, top-p and top-k: the reported numbers must still be the raw log-softmax.
    for sampling in (dict(temperature=0.0), dict(temperature=0.7, top_p=0.8, top_k=20, seed=3, n=2)):
        body = generate(client, max_tokens=16, logprobs=True, ignore_eos=True, **sampling)
        worst = 0.0
        for result in body["results"]:
            for completion in result["completions"]:
                ours = torch.tensor(completion["logprobs"])
                theirs = reference_logprobs(model, result["prompt_token_ids"], completion["token_ids"])
                worst = max(worst, float((ours - theirs).abs().max()))
        assert worst < MAX_ABS_LOGPROB_DIFF, f"{sampling}: max |logprob difference| = {worst:.2e}"


def test_greedy_after_push_equals_transformers(server, client, make_weights, reference):
    for seed in (22, 23):
        weights = make_weights(seed=seed)
        version = push_new(server, weights)
        model = reference(weights)
        body = generate(client, max_tokens=16, temperature=0.0, ignore_eos=True)
        assert body["weights_version"] == version
        for result in body["results"]:
            expected = reference_greedy(model, result["prompt_token_ids"], 16)
            assert result["completions"][0]["token_ids"] == expected


def test_bfloat16_push_is_cast(server, client, make_weights, reference):
    weights = make_weights(seed=24, dtype="bfloat16")
    version = push_new(server, weights)
    assert client.get("/weights").json()["tensors"]["model.norm.weight"]["dtype"] == "float32"
    model = reference(weights)  # the bf16 values, upcast to fp32 as the engine does
    body = generate(client, max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True)
    assert body["weights_version"] == version
    for result in body["results"]:
        completion = result["completions"][0]
        assert completion["token_ids"] == reference_greedy(model, result["prompt_token_ids"], 16)
        theirs = reference_logprobs(model, result["prompt_token_ids"], completion["token_ids"])
        assert float((torch.tensor(completion["logprobs"]) - theirs).abs().max()) < MAX_ABS_LOGPROB_DIFF


def test_load_from_checkpoint_root_file_and_sharded_folder(
    server, client, make_weights, reference, checkpoint_root
):
    weights = make_weights(seed=25)
    model = reference(weights)
    expected = generate(client, max_tokens=1)  # just the prompt ids
    expected = [reference_greedy(model, r["prompt_token_ids"], 12) for r in expected["results"]]

    # A single file, by absolute path.
    step = checkpoint_root / "run-a" / "step-1"
    step.mkdir(parents=True)
    shutil.copy(weights, step / "model.safetensors")
    version = server.weights_version() + 1
    response = client.post(
        "/weights/load", json={"path": str(step / "model.safetensors"), "version": version}
    )
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == weights.stat().st_size
    body = generate(client, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert body["weights_version"] == version
    assert [r["completions"][0]["token_ids"] for r in body["results"]] == expected

    # Back to other weights, then the same weights from a folder of two shards, by relative path.
    push_new(server, make_weights(seed=26))
    tensors = load_file(weights)
    names = sorted(tensors)
    sharded = checkpoint_root / "run-a" / "step-2"
    sharded.mkdir()
    save_file({k: tensors[k] for k in names[:5]}, sharded / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[5:]}, sharded / "model-00002-of-00002.safetensors")
    version = server.weights_version() + 1
    response = client.post("/weights/load", json={"path": "run-a/step-2", "version": version})
    assert response.status_code == 200, response.text
    body = generate(client, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert body["weights_version"] == version
    assert [r["completions"][0]["token_ids"] for r in body["results"]] == expected


def test_seeded_batch_larger_than_a_prefill_step(client):
    """A seeded batch whose prompts need more than one scheduler step to prefill (vLLM's CPU engine takes
    2048 tokens a step): 8 prompts of about 200 tokens, 8 samples each, about 13k prompt tokens. With chunked
    prefill, vLLM rewinds the seeded generator of a half-prefilled prompt, which a CPU generator cannot do
    ("CPU Generator does not use offset"): the engine died and every later request got 503. The server now
    prefills a prompt whole on the CPU; the answer must be right, repeatable and the engine still up."""
    prompts = [f"Story {i}: " + "the cat sat on the mat and looked at the dog. " * 9 for i in range(8)]
    request = dict(prompts=prompts, n=8, max_tokens=8, temperature=1.0, seed=1)
    first = generate(client, **request)
    lengths = [len(r["prompt_token_ids"]) for r in first["results"]]
    assert sum(lengths) * 8 > 2 * 2048, lengths  # the batch is larger than two prefill steps
    assert all(len(r["completions"]) == 8 for r in first["results"])
    second = generate(client, **request)
    assert [r["completions"] for r in first["results"]] == [r["completions"] for r in second["results"]]
    assert client.get("/health").json()["status"] == "ok"
