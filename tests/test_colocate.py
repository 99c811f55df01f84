"""The colocated engine (trainer_client/colocate.py): a real vLLM CPU engine inside the pytest process.

It must run in this very process, generate like the server's ``/generate`` (greedy outputs and raw
log-probabilities equal to transformers' in fp32), take new weights from a ``state_dict`` in memory, and
leave the trainer's threads and RNG alone. One engine serves the whole module.
"""

from __future__ import annotations

import os
import threading

import psutil
import pytest
import torch

from trainer_client.colocate import ColocatedEngine, EngineSettings
from trainer_client.dpo import collate, token_logps

PROMPTS = ["The cat sat on", "Once upon a time", "hello"]
TOLERANCE = 1e-3  # max abs difference of fp32 log-probabilities, as for the server


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.manual_seed(1234)
    expected_draws = torch.rand(4)
    torch.manual_seed(1234)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a trainer's choice; vLLM's worker sets its own
    engine = ColocatedEngine(EngineSettings(model=str(tiny_model_dir), dtype="float32", kv_cache_gib=1))
    engine.trainer_state_after_build = {  # what building did to the trainer's process state
        "draws_equal": torch.equal(torch.rand(4), expected_draws),
        "threads": (threads, torch.get_num_threads()),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "env": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
    }
    torch.set_float32_matmul_precision(precision)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of ``completion_ids`` after ``prompt_ids``, (len(completion),)."""
    input_ids, attention_mask, completion_mask = collate([prompt_ids], [completion_ids], pad_id=0)
    with torch.no_grad():
        logps = token_logps(model, input_ids, attention_mask)
    return logps[0][completion_mask[0].bool()]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def assert_matches_transformers(engine: ColocatedEngine, model) -> None:
    """Greedy completions equal, and the engine's log-probabilities within TOLERANCE of transformers'."""
    out = engine.generate(prompts=PROMPTS, max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True)
    for result in out.results:
        (completion,) = result.completions
        assert completion.token_ids == hf_greedy(model, result.prompt_token_ids, 12)
        expected = hf_logps(model, result.prompt_token_ids, completion.token_ids)
        assert (torch.tensor(completion.logprobs) - expected).abs().max().item() < TOLERANCE


def perturbed(model, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """The model's state dict plus seeded noise: a sharper model with clear greedy winners."""
    generator = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=generator) for n, t in model.state_dict().items()}


def test_engine_runs_in_this_process_and_leaves_trainer_state_alone(engine):
    assert engine.llm.collective_rpc(lambda worker: os.getpid()) == [os.getpid()]
    assert psutil.Process().children(recursive=True) == []  # no engine-core or worker processes
    state = engine.trainer_state_after_build
    assert state["draws_equal"], "building the engine changed torch's global RNG stream"
    threads_before, threads_after = state["threads"]
    assert threads_after == threads_before
    assert state["matmul_precision"] == "high"
    assert state["env"] is None or state["env"] == os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    assert not engine.sleep_supported  # vLLM's CPU build has no sleep mode


def test_generate_matches_transformers_then_handover_in_memory(engine, policy):
    assert_matches_transformers(engine, policy)
    version = engine.weights_version + 1
    new_state = perturbed(policy, seed=version)
    policy.load_state_dict(new_state)
    before = engine.generate(prompts=PROMPTS, max_tokens=12, temperature=0.0)
    seconds = engine.load_weights(policy.state_dict(), version)
    assert seconds > 0  # (how long: bench/colocate_vs_server.py; a test does not time it)
    assert engine.weights_version == version
    assert_matches_transformers(engine, policy)
    after = engine.generate(prompts=PROMPTS, max_tokens=12, temperature=0.0)
    assert after.weights_version == version and before.weights_version == version - 1
    assert [r.completions[0].token_ids for r in after.results] != [
        r.completions[0].token_ids for r in before.results
    ]
    # the engine holds a copy: training the policy further does not leak into the served weights
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(-1.0)
    again = engine.generate(prompts=PROMPTS, max_tokens=12, temperature=0.0)
    assert again.results == after.results
    policy.load_state_dict(new_state)


def test_sampled_logprobs_are_raw_and_seeds_repeat(engine, policy):
    """At temperature 0.7 with top-p 0.9 the reported log-probabilities are still the model's raw ones."""
    policy.load_state_dict(perturbed(policy, seed=99))
    engine.load_weights(policy.state_dict(), engine.weights_version + 1)
    kwargs = dict(prompts=PROMPTS, n=3, max_tokens=10, temperature=0.7, top_p=0.9, seed=7, logprobs=True)
    out = engine.generate(**kwargs)
    for result in out.results:
        assert len(result.completions) == 3
        for c in result.completions:
            assert c.finish_reason in ("stop", "length")
            expected = hf_logps(policy, result.prompt_token_ids, c.token_ids)
            assert (torch.tensor(c.logprobs) - expected).abs().max().item() < TOLERANCE
    assert engine.generate(**kwargs) == out
    draws = torch.get_rng_state()
    engine.generate(prompts=PROMPTS, n=2, max_tokens=5)  # no seed given: drawn privately
    assert torch.equal(torch.get_rng_state(), draws), "generation consumed the trainer's global RNG"


def test_bad_weights_are_refused_and_change_nothing(engine, policy):
    before = engine.generate(prompts=PROMPTS, max_tokens=8, temperature=0.0)
    version = engine.weights_version
    state = perturbed(policy, seed=5)
    name = next(iter(state))
    cases = {
        "missing tensor": {k: v for k, v in state.items() if k != name},
        "unknown tensor": {**state, "model.extra.weight": torch.zeros(2)},
        "has shape": {**state, name: state[name][:-1]},
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            engine.load_weights(bad, version + 1)
    with pytest.raises(ValueError, match="not greater"):
        engine.load_weights(state, version)
    assert engine.weights_version == version
    assert engine.generate(prompts=PROMPTS, max_tokens=8, temperature=0.0) == before


def test_prompt_token_ids_and_finish_reasons(engine):
    out = engine.generate(prompts=["hello world"], max_tokens=3, temperature=0.0)
    ids = out.results[0].prompt_token_ids
    same = engine.generate(prompt_token_ids=[ids], max_tokens=3, temperature=0.0)
    assert same.results == out.results
    assert out.results[0].completions[0].finish_reason == "length"
    with pytest.raises(ValueError, match="exactly one"):
        engine.generate(max_tokens=3)


def test_works_from_other_threads_with_fewer_torch_threads(engine, policy):
    """The loop calls generate and load_weights from its own threads, e.g. with 1 torch thread (the demo)."""
    threads = torch.get_num_threads()
    results, errors = [], []

    def call(fn):
        try:
            results.append(fn())
        except Exception as e:  # noqa: BLE001 - re-raised below in the test's thread
            errors.append(e)

    torch.set_num_threads(1)
    try:
        for fn in (
            lambda: engine.generate(prompts=PROMPTS * 2, n=2, max_tokens=6, seed=1),
            lambda: engine.load_weights(policy.state_dict(), engine.weights_version + 1),
        ):
            worker = threading.Thread(target=call, args=(fn,))
            worker.start()
            worker.join()
    finally:
        torch.set_num_threads(threads)
    assert not errors, errors
    assert len(results) == 2
