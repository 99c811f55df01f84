"""Unit tests of the DPO maths: losses against hand-computed values, masking, pairing."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer_client.dpo import (
    apply_missing_eos_penalty,
    build_pairs,
    collate,
    dpo_loss,
    sequence_logps,
    token_logps,
)

# Two pairs. h = (pi_c - pi_r) - (ref_c - ref_r):
#   pair 0: (-1 - -3) - (-1.5 - -2.5) = 2 - 1 = 1
#   pair 1: (-2 - -1) - (-2 - -1.5) = -1 + 0.5 = -0.5
CHOSEN = torch.tensor([-1.0, -2.0])
REJECTED = torch.tensor([-3.0, -1.0])
REF_CHOSEN = torch.tensor([-1.5, -2.0])
REF_REJECTED = torch.tensor([-2.5, -1.5])


def test_sigmoid_loss_hand_computed():
    # -log sigmoid(beta * h) = log(1 + exp(-beta * h)), beta = 0.1:
    #   log(1 + e^-0.1) = 0.6443966600735709, log(1 + e^0.05) = 0.7184596480132863
    losses = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, loss_type="sigmoid")
    assert losses.tolist() == pytest.approx([0.6443966600735709, 0.7184596480132863], abs=1e-6)


def test_ipo_loss_hand_computed():
    # (h - 1 / (2 beta))^2 with beta = 0.1: (1 - 5)^2 = 16, (-0.5 - 5)^2 = 30.25
    losses = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, loss_type="ipo")
    assert losses.tolist() == pytest.approx([16.0, 30.25], abs=1e-5)
    # beta = 0.5: target margin 1; pair 0 sits on it
    losses = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, loss_type="ipo")
    assert losses.tolist() == pytest.approx([0.0, 2.25], abs=1e-6)


def test_sigmoid_loss_gradient_pushes_chosen_up():
    chosen = CHOSEN.clone().requires_grad_(True)
    rejected = REJECTED.clone().requires_grad_(True)
    dpo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, 0.1, "sigmoid").sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.1, "hinge")


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_collate_masks_prompt_and_padding():
    input_ids, attention_mask, completion_mask = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


def test_sequence_logps_sums_completion_tokens_only(tiny_lm):
    prompts, completions = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    input_ids, attention_mask, completion_mask = collate(prompts, completions, pad_id=0)
    with torch.no_grad():
        got = sequence_logps(tiny_lm, input_ids, attention_mask, completion_mask)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([p + c])  # alone, no padding
            logp = torch.log_softmax(tiny_lm(ids).logits[0].float(), -1)  # (T, V)
            expected = sum(logp[len(p) + j - 1, tok] for j, tok in enumerate(c))  # token t given tokens < t
            assert got[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_token_logps_shape_and_first_position(tiny_lm):
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = token_logps(tiny_lm, ids, torch.ones_like(ids))
    assert out.shape == (1, 4) and out[0, 0] == 0 and (out[0, 1:] < 0).all()


def test_build_pairs_highest_vs_lowest_and_ties():
    rewards = [
        0.0, 1.0, 0.5, 1.0,  # prompt 0: chosen = first max (k=1), rejected = k=0
        0.3, 0.3, 0.3, 0.3,  # prompt 1: all tied -> skipped
        2.0, -1.0, -1.0, 0.0,  # prompt 2: chosen k=0, rejected first min k=1
    ]  # fmt: skip
    pairs, skipped = build_pairs(rewards, K=4)
    assert pairs == [(0, 1, 0), (2, 0, 1)]
    assert skipped == 1


def test_build_pairs_rejects_bad_shapes():
    with pytest.raises(ValueError):
        build_pairs([1.0, 2.0, 3.0], K=2)
    with pytest.raises(ValueError):
        build_pairs([1.0, 2.0], K=1)


def test_missing_eos_penalty():
    assert apply_missing_eos_penalty([1.0, 1.0, 0.0], [True, False, False], 0.5) == [1.0, 0.5, -0.5]
    assert apply_missing_eos_penalty([1.0], [False], 0.0) == [1.0]
