"""The online DPO maths: sequence log-probabilities, the DPO/IPO losses, and preference pairs.

Notation (Rafailov et al. 2023; Azar et al. 2023 for IPO): for a prompt x with a chosen completion y_c and a
rejected one y_r, ``pi_c = log pi(y_c | x)`` summed over the completion's tokens, ``ref_c`` the same under
the frozen reference, and

    h = (pi_c - pi_r) - (ref_c - ref_r)
    sigmoid (DPO):  loss = -log sigmoid(beta * h)
    ipo:            loss = (h - 1 / (2 * beta)) ** 2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------------------
def collate(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, length: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + completion`` token ids, at least ``length`` tokens long.

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask``, each (B, T); ``completion_mask`` is 1
    exactly on the completion's tokens (not the prompt, not the padding)."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    T = max(length, *(len(r) for r in rows))
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        completion_mask[i, len(p) : len(r)] = 1
    return input_ids, attention_mask, completion_mask


def token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """``log p(input_ids[:, t] | input_ids[:, :t])`` at every position t >= 1 where ``mask`` is set (default:
    everywhere); 0 at position 0 and where ``mask`` is 0.

    input_ids, attention_mask, mask: (B, T) -> (B, T), float32 whatever the model's dtype. ``chunk_tokens``
    > 0 takes the lm_head and the log-softmax that many masked tokens at a time (see
    :func:`chunked_token_logps`): the same values, without the (B, T, V) logits."""
    if chunk_tokens:
        return chunked_token_logps(model, input_ids, attention_mask, mask, chunk_tokens)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:].unsqueeze(-1)  # (B, T-1, 1)
    # log_softmax(logits)[target] without materialising the (B, T-1, V) log-softmax
    logps = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)  # (B, T-1)
    logps = F.pad(logps, (1, 0), value=0.0)  # (B, T)
    return logps if mask is None else logps * mask


AUTO_CHUNK_LOGITS_BYTES = 256 * 2**20
"""``logprob_chunk_tokens: auto``: the fp32 logits of one chunk (tokens x vocabulary x 4 bytes) take at most
this much memory (1365 tokens for a vocabulary of 49k, 524 for 128k)."""


def logits_transform(model) -> str | None:
    """The config key by which ``model``'s logits are more than its lm_head's output (Gemma 2/3's
    softcapping, a logit scale), or None: the chunked log-probabilities need None."""
    config = model.config.get_text_config()
    for key, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        if getattr(config, key, neutral) not in (None, neutral):
            return key
    return None


def auto_chunk_tokens(model) -> int:
    """``logprob_chunk_tokens: auto`` for ``model``: chunks of at most ``AUTO_CHUNK_LOGITS_BYTES`` of fp32
    logits, or 0 (the plain path) for a model whose logits are not its lm_head's output."""
    if logits_transform(model) is not None:
        return 0
    vocab = model.config.get_text_config().vocab_size
    return max(64, AUTO_CHUNK_LOGITS_BYTES // (4 * vocab))


def auto_chunks_for(chunk_tokens: int, device_type: str, tokens: int, vocab: int) -> int:
    """The chunk size ``logprob_chunk_tokens: auto`` uses for one forward of ``tokens`` positions (B x T):
    ``chunk_tokens`` on a CPU, where taking the lm_head over the completions only saves the prompt's share
    of its compute; on a GPU 0 (the plain path: no host sync to count the completion tokens, which a step
    bound by launching kernels feels) while the whole micro-batch's fp32 logits fit in
    ``AUTO_CHUNK_LOGITS_BYTES``, and ``chunk_tokens`` beyond (long generations)."""
    if device_type == "cpu" or tokens * vocab * 4 > AUTO_CHUNK_LOGITS_BYTES:
        return chunk_tokens
    return 0


def chunked_token_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor | None, chunk_tokens: int
) -> torch.Tensor:
    """:func:`token_logps` from the final hidden states, ``chunk_tokens`` tokens at a time through lm_head.

    Only the N masked positions go through the lm_head (the prompt's and the padding's logits are never
    computed), and each chunk's (chunk, V) logits are freed as soon as its log-probabilities are taken:
    with more than one chunk, under autograd, they are recomputed in the backward pass (activation
    checkpointing of the lm_head) instead of kept, for one more lm_head forward over the completions. Peak
    memory chunk x V instead of B x T x V. Needs a model whose logits are its lm_head's output."""
    key = logits_transform(model)
    if key is not None:
        raise ValueError(
            f"logprob_chunk_tokens: {type(model).__name__} transforms the lm_head's output ({key}); "
            "set logprob_chunk_tokens: 0"
        )
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, H)
    wanted = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask != 0  # (B, T)
    where = wanted[:, 1:]  # (B, T-1): token t is predicted from the hidden state at t-1
    states, targets = hidden[:, :-1][where], input_ids[:, 1:][where]  # (N, H), (N,)
    lm_head = model.get_output_embeddings()
    recompute = torch.is_grad_enabled() and len(targets) > chunk_tokens  # one chunk: keep its logits
    parts = []
    for i in range(0, len(targets), chunk_tokens):
        chunk = (lm_head, states[i : i + chunk_tokens], targets[i : i + chunk_tokens])
        if recompute:
            parts.append(checkpoint(_head_logps, *chunk, use_reentrant=False))  # (chunk,)
        else:
            parts.append(_head_logps(*chunk))
    logps = torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)  # (N,)
    logps = torch.zeros(where.shape, dtype=torch.float32, device=hidden.device).masked_scatter(where, logps)
    return F.pad(logps, (1, 0), value=0.0)  # (B, T)


def _head_logps(lm_head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, H), (n,) -> (n,): ``log_softmax(lm_head(states))[target]`` in fp32."""
    logits = lm_head(states).float()  # (n, V)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """``log pi(completion | prompt)``: token log-probabilities summed over completion tokens only.

    input_ids, attention_mask, completion_mask: (B, T) -> (B,)."""
    return (token_logps(model, input_ids, attention_mask) * completion_mask).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------
def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Per-pair loss (P,) from four (P,) tensors of summed completion log-probabilities."""
    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (P,)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")


# ---------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------
def apply_missing_eos_penalty(
    rewards: Sequence[float], finished: Sequence[bool], penalty: float
) -> list[float]:
    """Subtract ``penalty`` from the reward of every completion that did not finish (no EOS / stop string)."""
    return [r - (0.0 if done else penalty) for r, done in zip(rewards, finished, strict=True)]


def build_pairs(rewards: Sequence[float], K: int) -> tuple[list[tuple[int, int, int]], int]:
    """Preference pairs from ``rewards`` of B prompts x K samples, flattened prompt-major (B*K,).

    For each prompt the chosen sample is the one with the highest reward and the rejected one the lowest
    (first index among equals). Returns ``([(prompt, chosen_k, rejected_k), ...], skipped_ties)`` where
    ``skipped_ties`` counts prompts whose K rewards are all equal (no preference, no pair)."""
    if K < 2 or len(rewards) % K:
        raise ValueError(f"need K >= 2 and len(rewards) divisible by K; got K={K}, {len(rewards)} rewards")
    pairs, skipped_ties = [], 0
    for i in range(len(rewards) // K):
        group = list(rewards[i * K : (i + 1) * K])
        hi, lo = max(group), min(group)
        if hi == lo:
            skipped_ties += 1
            continue
        pairs.append((i, group.index(hi), group.index(lo)))
    return pairs, skipped_ties
