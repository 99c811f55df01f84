"""Unit tests of the learner (trainer_client/learner.py) and the chunked log-probabilities, on the CPU.

The tiny model's initial weights are nearly uniform, so the policy and the reference here are the tiny model
plus seeded noise (two different seeds): sharper distributions and a clear policy/reference gap, so the DPO
loss, its margin and its gradient are far from their trivial values at step 1. (With much more noise the
random network turns chaotic and bf16 drifts further from fp32 than a trained model does: at 5x this noise
the loss differed by 0.05.)
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer_client.config import ConfigError, TrainConfig, load_config
from trainer_client.dpo import collate, token_logps
from trainer_client.graphs import bucket
from trainer_client.learner import (
    Learner,
    NotFiniteError,
    check_finite,
    nonfinite,
    pair_rows,
    resolve_precision,
)

BF16_LOSS_TOLERANCE = 0.01
"""|loss bf16 - loss fp32| of one step on the pairs below (fp32: loss 0.666, margin h 1.13; measured 0.0015).
bf16 keeps 8 bits of mantissa: each logit moves by up to about 0.4%, a completion's summed log-probability
(4 to 12 tokens here) by a few hundredths, the margin h by 0.03 and the loss (beta 0.1) by about 0.002."""
BF16_MARGIN_TOLERANCE = 0.1
"""|h bf16 - h fp32| (measured 0.033)."""
EXACT_TOLERANCE = 1e-5
"""The same computation arranged differently in fp32 (checkpointed, chunked): equal up to rounding."""


def noisy_copy(model_dir: Path, out: Path, seed: int, scale: float = 0.1) -> Path:
    shutil.copytree(model_dir, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(out / "model.safetensors")
    noisy = {n: t + scale * torch.randn(t.shape, generator=generator) for n, t in tensors.items()}
    save_file(noisy, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("learner-models")
    return noisy_copy(tiny_model_dir, root / "policy", 1), noisy_copy(tiny_model_dir, root / "reference", 2)


def learner(models, **overrides) -> Learner:
    policy, reference = models
    config = dict(model=str(policy), ref_model=str(reference), learning_rate=1e-3, max_grad_norm=None)
    return Learner(TrainConfig(**config | overrides))


def grads(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in learner.policy.named_parameters()}


def assert_same_grads(a: dict, b: dict, tol: float = EXACT_TOLERANCE) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, msg=name)


# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------
def test_precision_auto_and_config_keys():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    c = load_config(None, ["model=m"])
    assert (c.precision, c.gradient_checkpointing, c.logprob_chunk_tokens) == ("auto", False, "auto")
    assert load_config(None, ["model=m", "logprob_chunk_tokens=64"]).logprob_chunk_tokens == 64
    for bad, key in (("precision=fp16", "precision"), ("logprob_chunk_tokens=-1", "logprob_chunk_tokens")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["model=m", bad])


def test_nonfinite_names_exactly_the_tensors_holding_nan_or_inf():
    """The check before every push: NaN, +Inf and -Inf anywhere are caught; finite values are not, even
    those whose squares overflow float32 (a 2-norm would call them infinite); empty shards are fine."""
    tensors = {
        "nan": torch.tensor([1.0, float("nan"), 2.0]),
        "inf": torch.tensor([[0.0, float("inf")]]),
        "minus_inf": torch.tensor([-float("inf"), 1.0]),
        "huge": torch.tensor([3e38, -3e38, 1e30]),
        "bf16_nan": torch.tensor([float("nan")], dtype=torch.bfloat16),
        "bf16": torch.ones(4, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "ids": torch.arange(3),  # not floating: not checked
    }
    floats = [n for n, t in tensors.items() if t.is_floating_point()]
    flags = dict(zip(floats, nonfinite([tensors[n] for n in floats]), strict=True))
    assert [n for n, bad in flags.items() if bad] == ["nan", "inf", "minus_inf", "bf16_nan"]
    with pytest.raises(NotFiniteError, match=r"\(nan, inf, minus_inf\), not pushed; lower"):
        check_finite(tensors, "lower the learning rate")
    check_finite({n: tensors[n] for n in ("huge", "bf16", "empty", "ids")}, "")
    assert nonfinite([]) == []


def test_bf16_step_is_close_to_fp32_and_keeps_fp32_master_weights(models, batch):
    fp32, bf16 = learner(models, precision="fp32"), learner(models, precision="bf16")
    a, b = fp32.train_step(*batch), bf16.train_step(*batch)
    assert a.logratio_margin > 1  # the policy and the reference differ: the loss is far from log 2
    assert abs(b.loss - a.loss) < BF16_LOSS_TOLERANCE, (a, b)
    assert abs(b.logratio_margin - a.logratio_margin) < BF16_MARGIN_TOLERANCE, (a, b)
    assert b.reward_accuracy == a.reward_accuracy
    assert b.grad_norm == pytest.approx(a.grad_norm, rel=0.02)  # (measured 0.04%)
    # fp32 master weights, gradients and AdamW state; a bf16 reference without gradients
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.policy.parameters())
    moments = [s["exp_avg"] for s in bf16.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in bf16.reference.parameters())
    assert all(t.dtype == torch.float32 for t in bf16.state_dict().values())


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_reference_taken_ahead_in_another_thread_makes_the_same_step(models, batch, micro_batch_size):
    """``reference_ahead``: the reference's log-probabilities of the pairs, taken in another thread as the
    producer takes them, give the step the loss, statistics and gradients it computes with the reference
    forward inside it, and the step then runs no reference forward of its own."""
    samples, pairs = batch
    inside, ahead = (learner(models, micro_batch_size=micro_batch_size) for _ in range(2))
    taken = []
    thread = threading.Thread(target=lambda: taken.append(ahead.reference_pair_logps(samples, pairs)))
    thread.start()
    thread.join()
    reference = taken[0]
    assert reference.shape == (len(pairs), 2) and reference.device.type == "cpu"
    i, kc, kr = pairs[0]  # the first pair's chosen and rejected sequences, scored by the reference alone
    ids, mask, completion = collate([samples.prompt_token_ids[i]] * 2, [
        samples.completions[i][kc].token_ids, samples.completions[i][kr].token_ids
    ], 0)  # fmt: skip
    with torch.no_grad():
        direct = (token_logps(ahead.reference, ids, mask) * completion).sum(-1, dtype=torch.float64)
    torch.testing.assert_close(reference[0], direct, rtol=0, atol=EXACT_TOLERANCE)

    calls = []
    ahead.reference.register_forward_hook(lambda *_: calls.append(1))
    a, b = inside.train_step(samples, pairs), ahead.train_step(samples, pairs, reference)
    assert not calls  # the step did not run the reference
    for field in ("loss", "kl", "reward_accuracy", "logratio_margin", "grad_norm"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), abs=EXACT_TOLERANCE), field
    assert_same_grads(grads(inside), grads(ahead))


# ----------------------------------------------------------------------------------------------------------
# Padded shapes and CUDA graphs
# ----------------------------------------------------------------------------------------------------------
NINE_PAIRS = [(b, kc, kr) for b in range(3) for kc, kr in ((0, 1), (1, 2), (2, 0))]
"""Every prompt of ``batch`` three times: 9 pairs, padded to 12 (or, in micro-batches of 5, 5 to 6)."""


def test_buckets_round_up_by_at_most_half_into_two_shapes_per_doubling():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 16, 17, 24, 25, 33)] == [
        1, 2, 3, 4, 6, 8, 12, 16, 24, 24, 32, 48
    ]  # fmt: skip
    for n in range(1, 2000):
        assert n <= bucket(n) <= 1.5 * n and bucket(n, 16) >= 16
    for k in range(2, 10):  # (2^k, 2^(k+1)] falls into two buckets
        assert len({bucket(n) for n in range(2**k + 1, 2 ** (k + 1) + 1)}) == 2


@pytest.mark.parametrize("micro_batch_size", [None, 5])
def test_padded_step_same_as_unpadded(models, batch, micro_batch_size):
    """What ``cuda_graphs`` needs, micro-batches padded to a few shapes, changes no gradient and no statistic:
    padding pairs have weight 0 and no completion, padding tokens come after each sequence's end."""
    samples, _ = batch
    # (the plain lm_head path, which cuda_graphs's `logprob_chunk_tokens: auto` resolves to)
    plain, padded = (
        learner(models, micro_batch_size=micro_batch_size, logprob_chunk_tokens=0) for _ in range(2)
    )
    padded.pad_shapes = True
    shapes = []
    padded.policy.register_forward_pre_hook(
        lambda _module, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    reference = padded.reference_pair_logps(samples, NINE_PAIRS)
    # equal up to fp32 rounding: other shapes, other matmul blocking (transformers 5.19 on the CPU differed by
    # 1.4e-6 in a sum of about 66; a padding token that leaked into a sequence would change it by far more)
    torch.testing.assert_close(
        reference, plain.reference_pair_logps(samples, NINE_PAIRS), rtol=0, atol=EXACT_TOLERANCE
    )
    for ahead in (None, reference):
        a, b = plain.train_step(samples, NINE_PAIRS, ahead), padded.train_step(samples, NINE_PAIRS, ahead)
        for field in ("loss", "kl", "reward_accuracy", "logratio_margin", "grad_norm"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), abs=EXACT_TOLERANCE), field
        assert_same_grads(grads(plain), grads(padded))
    # the policy saw padded shapes: 2 x 12 rows of 24 tokens, or micro-batches of 2 x 6 and 2 x 4 rows
    rows = [24] if micro_batch_size is None else [12, 8]
    assert shapes == [(r, 24) for r in rows] * 2, shapes


def test_cuda_graphs_refused_where_they_cannot_run(models):
    with pytest.raises(ConfigError, match="cuda_graphs: not with gradient_checkpointing"):
        load_config(None, ["model=m", "cuda_graphs=true", "gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="cuda_graphs"):
        load_config(None, ["model=m", "cuda_graphs=true", "logprob_chunk_tokens=64"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs: needs one process on a CUDA device"):
            learner(models, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 2e-3)])
@pytest.mark.parametrize("micro_batch_size", [None, 5])
def test_cuda_graph_steps_same_as_eager_steps(models, batch, precision, tolerance, micro_batch_size):
    """Steps replayed from CUDA graphs give the statistics and gradients of eager steps on the same padded
    shapes, across new shapes recorded mid-run (and mid-step, between micro-batches)."""
    samples, three_pairs = batch
    eager, graphed = (
        learner(models, device="cuda", precision=precision, micro_batch_size=micro_batch_size, cuda_graphs=g)
        for g in (False, True)
    )
    eager.pad_shapes = True  # (the same shapes: the graphs replay the eager kernels)
    for step, pairs in enumerate((NINE_PAIRS, three_pairs, NINE_PAIRS, three_pairs)):
        reference = None
        if step >= 2:  # the reference's log-probabilities from its graphs in another thread, as the producer
            with ThreadPoolExecutor(1) as producer:
                reference = producer.submit(graphed.reference_pair_logps, samples, pairs).result()
            expected = eager.reference_pair_logps(samples, pairs)
            torch.testing.assert_close(reference, expected, rtol=0, atol=tolerance)
        a, b = eager.train_step(samples, pairs), graphed.train_step(samples, pairs, reference)
        for field in ("loss", "kl", "reward_accuracy", "logratio_margin", "grad_norm"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), abs=tolerance), (field, pairs)
        assert_same_grads(grads(eager), grads(graphed), tolerance)
    shapes = 2 if micro_batch_size is None else 3  # 12 and 3 pairs; or 6, 4 and 3
    assert len(graphed.graphs.graphs) == len(graphed.reference_graphs.graphs) == shapes


# ----------------------------------------------------------------------------------------------------------
# Memory: gradient checkpointing, chunked log-probabilities
# ----------------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_same_loss_and_gradients(models, batch):
    plain, checkpointed = learner(models), learner(models, gradient_checkpointing=True)
    layer, calls = checkpointed.policy.model.layers[0], []
    mlp_forward = layer.mlp.forward
    layer.mlp.forward = lambda *args: calls.append(1) or mlp_forward(*args)  # (hooks miss the recompute)
    a, b = plain.train_step(*batch), checkpointed.train_step(*batch)
    assert len(calls) == 2  # the layer ran again in the backward pass: it was checkpointed
    assert not any(m.training for m in layer.children())  # dropout modules stay off
    assert b.loss == pytest.approx(a.loss, abs=EXACT_TOLERANCE)
    assert b.grad_norm == pytest.approx(a.grad_norm, abs=EXACT_TOLERANCE)
    assert_same_grads(grads(plain), grads(checkpointed))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_logps_same_values_and_gradients(models, chunk_tokens, masked):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()
    input_ids, attention_mask, completion_mask = collate([[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]], 0)
    mask = completion_mask if masked else None
    weights = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(0))  # (B, T)

    def logps_and_grads(chunk: int):
        model.zero_grad()
        logps = token_logps(model, input_ids, attention_mask, mask, chunk)  # (B, T)
        (logps * weights).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = logps_and_grads(0)
    rows = []  # tokens per lm_head call
    model.lm_head.register_forward_hook(lambda _module, _input, out: rows.append(out.shape[0]))
    chunked, chunked_grads = logps_and_grads(chunk_tokens)
    torch.testing.assert_close(chunked, full, rtol=0, atol=EXACT_TOLERANCE)
    assert_same_grads(full_grads, chunked_grads)
    if masked:
        assert (chunked[completion_mask == 0] == 0).all()
    assert rows and max(rows) <= chunk_tokens  # never the (B, T, V) logits at once


def test_chunked_learner_step_same_as_unchunked(models, batch):
    plain = learner(models, micro_batch_size=2, logprob_chunk_tokens=0)
    chunked = learner(models, micro_batch_size=2, logprob_chunk_tokens=5)
    a, b = plain.train_step(*batch), chunked.train_step(*batch)
    assert b.loss == pytest.approx(a.loss, abs=EXACT_TOLERANCE)
    assert b.kl == pytest.approx(a.kl, abs=EXACT_TOLERANCE)
    assert b.grad_norm == pytest.approx(a.grad_norm, abs=EXACT_TOLERANCE)
    assert_same_grads(grads(plain), grads(chunked))


def test_bf16_with_checkpointing_and_chunks_same_as_bf16(models, batch):
    plain = learner(models, precision="bf16", micro_batch_size=2, logprob_chunk_tokens=0)
    lean = learner(
        models, precision="bf16", micro_batch_size=2, gradient_checkpointing=True, logprob_chunk_tokens=5
    )
    a, b = plain.train_step(*batch), lean.train_step(*batch)
    assert b.loss == pytest.approx(a.loss, abs=EXACT_TOLERANCE)
    assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    ours, theirs = grads(plain), grads(lean)
    # the lm_head's weight gradient is a bf16 matmul over all tokens at once in one, chunk by chunk (summed in
    # fp32) in the other: it differs by bf16 rounding (measured 0.7% of its largest entry); the rest is equal
    head, lean_head = ours.pop("lm_head.weight"), theirs.pop("lm_head.weight")
    torch.testing.assert_close(lean_head, head, rtol=0, atol=0.02 * head.abs().max().item())
    assert_same_grads(ours, theirs)


def test_auto_chunks_take_the_lm_head_over_completions_only(models, batch):
    """By default (`logprob_chunk_tokens: auto`) the lm_head runs over the completions' tokens only, in
    chunks of at most 256 MiB of fp32 logits, with the plain path's loss and gradients; the plain path for a
    model whose logits are transformed, and with cuda_graphs."""
    from trainer_client.dpo import AUTO_CHUNK_LOGITS_BYTES, auto_chunk_tokens

    plain, auto = learner(models, logprob_chunk_tokens=0), learner(models)
    vocab = auto.policy.config.vocab_size
    assert auto.policy_logps.chunk_tokens == max(64, AUTO_CHUNK_LOGITS_BYTES // (4 * vocab))
    rows = []  # positions per lm_head call of the policy
    auto.policy.lm_head.register_forward_hook(
        lambda _module, _input, out: rows.append(out.shape[:-1].numel())
    )
    a, b = plain.train_step(*batch), auto.train_step(*batch)
    samples, pairs = batch
    completion_tokens = sum(len(c) + len(r) for _, c, r in pair_rows(samples, pairs))
    assert rows == [completion_tokens]  # every completion token, no prompt's, no padding
    assert b.loss == pytest.approx(a.loss, abs=EXACT_TOLERANCE)
    assert b.grad_norm == pytest.approx(a.grad_norm, abs=EXACT_TOLERANCE)
    assert_same_grads(grads(plain), grads(auto))
    auto.policy.config.logit_scale = 0.5
    assert auto_chunk_tokens(auto.policy) == 0


def test_auto_chunks_on_a_gpu_only_beyond_the_logits_bound():
    """`auto` keeps the plain path on a GPU while a micro-batch's fp32 logits fit in the bound (no host sync
    to count completion tokens), chunks beyond it (long generations), and always chunks on the CPU."""
    from trainer_client.dpo import AUTO_CHUNK_LOGITS_BYTES, auto_chunks_for

    vocab = 49152
    fits = AUTO_CHUNK_LOGITS_BYTES // (4 * vocab)  # positions whose logits fill the bound
    assert auto_chunks_for(1365, "cuda", fits, vocab) == 0
    assert auto_chunks_for(1365, "cuda", 64 * 1280, vocab) == 1365  # 64 sequences of 1280 tokens: 16 GB
    assert auto_chunks_for(1365, "cpu", 8, vocab) == 1365


def test_chunked_logps_refuse_a_transformed_lm_head(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()
    model.config.logit_scale = 0.5
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="logprob_chunk_tokens"):
        token_logps(model, ids, torch.ones_like(ids), chunk_tokens=2)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def test_checkpoint_resumes_step_weights_and_optimizer(models, batch, tmp_path):
    first = learner(models)
    first.train_step(*batch)
    path = first.save_checkpoint(tmp_path / "checkpoint-000001", extra={"note": 1})
    resumed = Learner(first.config, resume=str(path))
    assert resumed.step == 1
    for name, tensor in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed.train_step(*batch) == first.train_step(*batch)  # the same second step, to the bit
