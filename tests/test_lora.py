"""LoRA (issue 28): the learner's adapters, adapter-only pushes to a server with --enable-lora, and the
trainer end to end with them.

One server of this module's own runs with ``--enable-lora --max-lora-rank 8`` on the tiny model; the session's
shared ``server`` (no LoRA) shows the refusals. The tiny model's weights are nearly uniform, so the adapters
pushed by hand here have a large B (a clear change in what is served); the trainer's own start at B = 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    API_KEY,
    REFERENCE_LOGPROB_TOLERANCE,
    probe,
    read_metrics,
    same_weights,
    without_timings,
)
from safetensors.torch import load_file, save
from server_process import running_server

from online_dpo_protocol.models import ADAPTER_METADATA_KEY
from trainer_client.client import Completion, GeneratorClient
from trainer_client.colocate import engine_lora_rank
from trainer_client.config import ConfigError, TrainConfig, load_config
from trainer_client.learner import Learner
from trainer_client.lora import MergedWeights, adapter_tensors, base_tensors, is_lora_checkpoint, wire_config
from trainer_client.server_backend import ServerBackend
from trainer_client.train import IncompatibleServerError, run_training
from trainer_client.transports.http import HttpTransport
from trainer_client.transports.stream import StreamTransport

MAX_RANK = 8


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir):
    with running_server(
        tiny_model_dir, "--api-key", API_KEY, "--max-model-len", "256", "--stream-port", "0",
        "--enable-lora", "--max-lora-rank", str(MAX_RANK),
    ) as handle:  # fmt: skip
        yield handle


def adapted(model_dir: Path, seed: int, rank: int = 4, targets=None, scale: float = 0.5):
    """The tiny model with LoRA adapters whose B is seeded noise (peft starts B at 0: no change)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or "all-linear")
    policy = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return policy.eval()


def merged_folder(policy, model_dir: Path, out: Path) -> Path:
    """A plain model folder of ``policy`` with its adapters merged in (what the server should serve)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(dict(MergedWeights(policy)))
    model.save_pretrained(out)
    shutil.copy(model_dir / "tokenizer.json", out)
    return out


def served_logprob_gap(answer: dict, model_dir: Path) -> float:
    """Largest |served - transformers| log-probability of a probe answer's completions under ``model_dir``."""
    from conftest import max_logprob_diff_to_trainer

    samples = [
        (r["prompt_token_ids"], Completion(**c)) for r in answer["results"] for c in r["completions"]
    ]  # fmt: skip
    return max_logprob_diff_to_trainer(model_dir, samples)


def adapter_body(policy, edit=None, metadata: bool = True) -> bytes:
    tensors = {n: t.detach().contiguous() for n, t in adapter_tensors(policy).items()}
    if edit is not None:
        edit(tensors)
    meta = {ADAPTER_METADATA_KEY: json.dumps(wire_config(policy))} if metadata else None
    return save(tensors, metadata=meta)


# ----------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------
def test_adapter_pushes_serve_base_plus_adapter(lora_server, tiny_model_dir, tmp_path):
    """An adapter pushed by http, then another by stream: each version serves the base plus that adapter
    (the log-probabilities of the merged model), on /generate and /v1 alike, and only the adapter travels."""
    client = GeneratorClient(lora_server.url, api_key=API_KEY)
    spec = client.weights_spec()
    assert spec.max_lora_rank == MAX_RANK
    full_bytes = sum(4 * torch.Size(t.shape).numel() for t in spec.tensors.values())
    with lora_server.client() as http:
        answers, version = [probe(http)], spec.weights_version
        for seed, transport in ((1, HttpTransport(client)), (2, StreamTransport(client))):
            policy = adapted(tiny_model_dir, seed)
            tensors, config = adapter_tensors(policy), wire_config(policy)
            version += 1
            snapshot = transport.snapshot(tensors, dict.fromkeys(tensors, "float32"), adapter=config)
            update = transport.push(snapshot, version)
            assert update["weights_version"] == version
            assert 0 < update["bytes"] < full_bytes / 10  # the adapter alone
            answer = probe(http)
            assert answer["weights_version"] == version
            assert all(not same_weights(answer, earlier) for earlier in answers)
            merged = merged_folder(policy, tiny_model_dir, tmp_path / f"merged-{seed}")
            assert served_logprob_gap(answer, merged) < REFERENCE_LOGPROB_TOLERANCE
            answers.append(answer)
            # /v1 answers with the same version's adapter
            prompt = answer["results"][0]
            body = {"model": str(tiny_model_dir), "prompt": "The cat sat", "max_tokens": 12, "temperature": 0}
            v1 = http.post("/v1/completions", json={**body, "ignore_eos": True})
            assert v1.status_code == 200, v1.text
            assert v1.headers["x-weights-version"] == str(version)
            assert v1.json()["model"] == str(tiny_model_dir)
            assert v1.json()["choices"][0]["text"] == prompt["completions"][0]["text"]
    client.close()


def test_bad_adapters_are_refused_and_the_version_stays(lora_server, tiny_model_dir):
    """Refused before the engine is touched, each with a 400 naming the problem; the version served before
    stays served."""
    policy = adapted(tiny_model_dir, 3)
    a_name = next(n for n in adapter_tensors(policy) if n.endswith("q_proj.lora_A.weight"))
    over = adapted(tiny_model_dir, 3, rank=16)

    def drop_b(tensors):
        del tensors[a_name.replace("lora_A", "lora_B")]

    def reshape(tensors):
        tensors[a_name] = torch.zeros(4, 64)

    def unknown(tensors):
        tensors["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 128)

    cases = [
        (adapter_body(over), "rank r=16 is not from 1 to this server's --max-lora-rank 8"),
        (adapter_body(policy, metadata=False), "adapter_config.json as JSON under the 'adapter_config' key"),
        (adapter_body(policy, drop_b), "has lora_A without lora_B"),
        (adapter_body(policy, reshape), "has shape [4, 64], expected [4, 128]"),
        (adapter_body(policy, unknown), "'model.layers.0.self_attn.nope' is no linear layer"),
    ]
    with lora_server.client() as http:
        before = probe(http)
        for body, message in cases:
            version = before["weights_version"] + 1
            answer = http.put("/weights", params={"version": version, "adapter": "true"}, content=body)
            assert answer.status_code == 400 and message in answer.json()["detail"], answer.text
        after = probe(http)
        assert same_weights(after, before) and after["weights_version"] == before["weights_version"]


def test_a_server_without_lora_refuses_adapter_pushes(server, client, tiny_model_dir, tmp_path):
    """The shared server has no --enable-lora: an adapter push is a clear 400 by every route, and nothing
    changes; the trainer refuses to start against it with lora_sync: adapter."""
    before = probe(client)
    version = before["weights_version"] + 1
    body = adapter_body(adapted(tiny_model_dir, 5))
    refusals = [
        client.put("/weights", params={"version": version, "adapter": "true"}, content=body),
        client.post("/weights/stream/begin", json={"version": version, "bytes": len(body), "adapter": True}),
        client.post("/weights/load", json={"path": "x.safetensors", "version": version, "adapter": True}),
    ]
    for answer in refusals:
        assert answer.status_code == 400, answer.text
        assert "serves no LoRA adapters: start it with --enable-lora" in answer.json()["detail"]
    assert client.get("/weights").json()["max_lora_rank"] is None
    after = probe(client)
    assert same_weights(after, before) and after["weights_version"] == before["weights_version"]
    config = TrainConfig(
        model=str(tiny_model_dir), server_url=server.url, api_key=API_KEY, lora_rank=4,
        output_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(IncompatibleServerError, match="takes no LoRA adapters.*lora_sync: merged"):
        run_training(config)


# ----------------------------------------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------------------------------------
def lora_learner(model_dir: Path, **overrides) -> Learner:
    torch.manual_seed(0)  # (peft's initial A)
    config = dict(model=str(model_dir), lora_rank=4, learning_rate=1e-2, max_grad_norm=None, precision="fp32")
    return Learner(TrainConfig(**config | overrides))


def test_lora_trains_the_adapters_only_against_the_base(tiny_model_dir, batch):
    """Only the adapters train; the reference (the base with the adapters off) is the base model itself:
    the same steps as with a second copy of the base as ref_model; the base stays as it was."""
    lean = lora_learner(tiny_model_dir)
    assert not lean.reference_ahead and lean.reference is None
    assert {p.dtype for p in lean.trainable} == {torch.float32}
    assert all(".lora_" in n for n, p in lean.policy.named_parameters() if p.requires_grad)
    base = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(t, base[n]) for n, t in lean.full_weights().items())  # B = 0: merged is the base
    copy = lora_learner(tiny_model_dir, ref_model=str(tiny_model_dir))
    first, first_copy = lean.train_step(*batch), copy.train_step(*batch)
    assert first.kl == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the base
    second, second_copy = lean.train_step(*batch), copy.train_step(*batch)
    assert (first.loss, second.loss) == pytest.approx((first_copy.loss, second_copy.loss), abs=1e-6)
    assert second.kl > 0 and second.kl == pytest.approx(second_copy.kl, abs=1e-6)
    assert all(torch.equal(t, base[n]) for n, t in base_tensors(lean.policy).items())  # frozen
    assert any(not torch.equal(t, base[n]) for n, t in lean.full_weights().items())  # the merged moved


@pytest.mark.parametrize(
    "options", [dict(gradient_checkpointing=True, logprob_chunk_tokens=5), dict(precision="bf16")]
)
def test_lora_with_checkpointing_chunks_and_bf16(tiny_model_dir, batch, options):
    """Activation checkpointing and chunked log-probabilities: the same step; bf16 (a bf16 base, fp32
    adapters): close to it."""
    plain, other = lora_learner(tiny_model_dir), lora_learner(tiny_model_dir, **options)
    for _ in range(2):
        a, b = plain.train_step(*batch), other.train_step(*batch)
    tolerance = 0.01 if options.get("precision") == "bf16" else 1e-5
    assert b.loss == pytest.approx(a.loss, abs=tolerance)
    assert b.kl == pytest.approx(a.kl, abs=10 * tolerance)
    if options.get("precision") == "bf16":
        assert other.net.model.embed_tokens.weight.dtype == torch.bfloat16


def test_lora_config_refusals():
    for overrides, message in (
        (["lora_rank=4", "cuda_graphs=true"], "cuda_graphs: not with lora_rank > 0"),
        (["lora_rank=4", "push=ipc"], "push: ipc carries whole models only"),
        (["lora_alpha=8"], r"\['lora_alpha'\] apply only with lora_rank > 0"),
        (["lora_rank=4", "lora_target_modules=[]"], "lora_target_modules: the list is empty"),
        (["lora_rank=1024"], "lora_rank 1024 is over 512, the largest LoRA rank vLLM serves"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model=m", *overrides])
    assert load_config(None, ["model=m", "lora_rank=4", "push=ipc", "lora_sync=merged"]).lora_sync == "merged"
    assert load_config(None, ["model=m", "lora_rank=1024", "lora_sync=merged"]).lora_rank == 1024  # (merged)
    # the engine's rank for adapter pushes: the smallest vLLM takes that holds lora_rank
    ranks = [engine_lora_rank(load_config(None, ["model=m", f"lora_rank={r}"])) for r in (1, 4, 16, 300, 512)]
    assert ranks == [1, 8, 16, 320, 512]
    assert engine_lora_rank(load_config(None, ["model=m", "lora_rank=4", "lora_sync=merged"])) is None


def test_lora_checkpoint_is_peft_folder_and_merges(tiny_model_dir, batch, tmp_path):
    """A checkpoint holds peft's adapter folder (PeftModel.from_pretrained loads it); resuming restores the
    adapters and AdamW exactly (the same next step, to the bit); merge-lora writes a plain model folder whose
    weights are the learner's merged ones."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer_client.cli import main

    first = lora_learner(tiny_model_dir, lora_target_modules=["q_proj", "v_proj"])
    first.train_step(*batch)
    path = first.save_checkpoint(tmp_path / "checkpoint-000001", extra={})
    assert is_lora_checkpoint(path) and not (path / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path)
    ours = adapter_tensors(first.policy)
    assert all(torch.equal(t, ours[n]) for n, t in adapter_tensors(loaded).items())
    resumed = Learner(first.config, resume=str(path))
    assert resumed.step == 1
    assert resumed.train_step(*batch) == first.train_step(*batch)
    with pytest.raises(ValueError, match="holds LoRA adapters; this run has lora_rank 0"):
        Learner(TrainConfig(model=str(tiny_model_dir)), resume=str(path))
    assert main(["merge-lora", str(path), "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reloaded = Learner(first.config, resume=str(path))  # (as at the checkpoint)
    for name, tensor in reloaded.full_weights().items():
        torch.testing.assert_close(merged[name], tensor.float(), rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------
# The trainer end to end
# ----------------------------------------------------------------------------------------------------------
class ProbingBackend(ServerBackend):
    """The real server backend, which also asks the server for a greedy answer after every push (the
    version each push made served)."""

    answers: list[dict] = []

    def push(self, snapshot, version):
        out = super().push(snapshot, version)
        with httpx.Client(base_url=self.client.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            ProbingBackend.answers.append(probe(c))
        return out


def lora_run(lora_server, tiny_model_dir, length_task, out: Path, resume=None, **overrides) -> dict:
    from trainer_client.client import GeneratorClient as Client

    config = TrainConfig(
        model=str(tiny_model_dir), server_url=lora_server.url, api_key=API_KEY, task=str(length_task),
        reward="length", steps=3, batch_size=4, samples_per_prompt=4, max_new_tokens=16, learning_rate=1e-2,
        max_staleness=0, progress_bar=False, precision="fp32", lora_rank=4, checkpoint_every=1,
        output_dir=str(out), **overrides,
    )  # fmt: skip
    backend = ProbingBackend(Client(lora_server.url, api_key=API_KEY), push=config.push, config=config)
    try:
        return run_training(config, resume=resume, backend=backend)
    finally:
        backend.close()


def test_lora_run_pushes_adapters_and_resumes_exactly(lora_server, tiny_model_dir, length_task, tmp_path):
    """Three steps of LoRA against the LoRA server: every push is the adapter alone (push_bytes, a small
    fraction of the model), each version's served answer differs from the one before, the end writes the
    merged model; resuming from step 2 writes the same metrics and the same final adapters."""
    ProbingBackend.answers = []
    out = tmp_path / "run"
    summary = lora_run(lora_server, tiny_model_dir, length_task, out, save_merged=True)
    records = read_metrics(out)
    full = sum(t.numel() * 4 for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 < r["push_bytes"] < full / 10 for r in records), [r["push_bytes"] for r in records]
    # each push's time as the trainer saw it is split as the server reported it: its pause, and its wait
    assert all(r["push_pause_seconds"] > 0 and r["push_wait_seconds"] >= 0 for r in records), records
    answers = ProbingBackend.answers[-3:]
    assert [a["weights_version"] for a in answers] == [s + summary["version_offset"] for s in (1, 2, 3)]
    assert not any(same_weights(a, b) for a, b in zip(answers, answers[1:], strict=False))
    # the merged model is what the server served last
    assert served_logprob_gap(answers[-1], Path(summary["merged_model"])) < REFERENCE_LOGPROB_TOLERANCE

    final = load_file(out / "checkpoint-000003" / "adapter_model.safetensors")
    lora_run(lora_server, tiny_model_dir, length_task, out, str(out / "checkpoint-000002"), save_merged=True)
    assert without_timings(read_metrics(out)) == without_timings(records)
    resumed = load_file(out / "checkpoint-000003" / "adapter_model.safetensors")
    assert final.keys() == resumed.keys() and all(torch.equal(final[n], resumed[n]) for n in final)


def test_lora_merged_sync_to_a_server_without_lora(server, tiny_model_dir, length_task, tmp_path):
    """lora_sync: merged pushes whole weights (the adapters merged in) to a server without LoRA."""
    config = TrainConfig(
        model=str(tiny_model_dir), server_url=server.url, api_key=API_KEY, task=str(length_task),
        reward="length", steps=2, batch_size=4, samples_per_prompt=4, max_new_tokens=16, learning_rate=1e-2,
        progress_bar=False, lora_rank=4, lora_sync="merged", output_dir=str(tmp_path),
    )  # fmt: skip
    summary = run_training(config)
    records = read_metrics(tmp_path)
    assert server.weights_version() == summary["server_version"]
    assert all(r["push_bytes"] > 1_000_000 for r in records)  # every tensor of the model


def test_lora_in_colocated_mode(tiny_model_dir, length_task, tmp_path):
    """mode: colocate with LoRA: the in-process engine takes each version's adapter (in memory) and serves
    the base plus it: its log-probabilities are the merged model's the run writes at its end."""
    import trainer_client.train as train_module

    backends = []

    def keep_open(config):
        backend = make_backend(config)
        backends.append(backend)
        backend.close = lambda: None  # closed below, after the check
        return backend

    make_backend = train_module.make_backend
    config = TrainConfig(
        mode="colocate", model=str(tiny_model_dir), task=str(length_task), reward="length", steps=2,
        batch_size=4, samples_per_prompt=4, max_new_tokens=16, learning_rate=1e-2, progress_bar=False,
        lora_rank=4, save_merged=True, colocate_kv_cache_gib=1, output_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "make_backend", keep_open)
        summary = run_training(config)
    (backend,) = backends
    try:
        assert backend.version() == 2 and backend.engine.adapter is not None
        records = read_metrics(tmp_path)
        full = sum(t.numel() * 4 for t in load_file(tiny_model_dir / "model.safetensors").values())
        assert all(0 < r["push_bytes"] < full / 10 for r in records)
        out = backend.engine.generate(
            prompts=["The cat sat", "Hello world, this is"], max_tokens=12, temperature=0.0, logprobs=True,
            ignore_eos=True,
        )  # fmt: skip
        answer = out.model_dump()
        assert served_logprob_gap(answer, Path(summary["merged_model"])) < REFERENCE_LOGPROB_TOLERANCE
    finally:
        backend.engine.close()


def test_whole_weights_replace_the_adapter(lora_server, tiny_model_dir, length_task, tmp_path):
    """A whole push to a LoRA server (lora_sync: merged) serves those weights, without an adapter; a trainer
    that would push adapters of its model then refuses to start, since they would be served on those
    weights (`base_version`). (Last of the module: the LoRA server's base is not the model's any more.)"""
    policy = adapted(tiny_model_dir, 4)
    merged = merged_folder(policy, tiny_model_dir, tmp_path / "merged")
    client = GeneratorClient(lora_server.url, api_key=API_KEY)
    version = client.health().weights_version + 1
    client.push_weights(load_file(merged / "model.safetensors"), version)
    with lora_server.client() as http:
        answer = probe(http)
    assert answer["weights_version"] == version
    assert served_logprob_gap(answer, merged) < REFERENCE_LOGPROB_TOLERANCE
    assert client.weights_spec().base_version == version
    client.close()
    with pytest.raises(IncompatibleServerError, match=f"serves whole weights pushed as version {version}"):
        lora_run(lora_server, tiny_model_dir, length_task, tmp_path / "run")
