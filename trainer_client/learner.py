"""The learner: the policy, the frozen reference, AdamW and the DPO step, on one device.

The training loop (train.py) gives it the samples of a step and their preference pairs and gets the step's
statistics back; it reads the weights to push with ``state_dict()`` and saves checkpoints through it. All
that concerns devices, precision and memory lives here, so that a learner sharded over several GPUs
(torchrun, FSDP2's ``fully_shard`` per decoder layer with a ``MixedPrecisionPolicy``) changes this file and
not the loop: it gains ``is_main`` (the rank that pushes, logs and writes) and gathers full tensors in
``state_dict()`` and ``save_checkpoint``; the loop sees no ranks and no collectives.

Precision (``config.precision``):
    fp32  weights, activations, gradients and AdamW state in float32; TF32 stays off (torch's default), so
          fp32 is the exact reference the other settings are measured against.
    bf16  forward and backward under ``torch.autocast(bfloat16)``: matmuls in bf16, while the weights
          (master weights), gradients and AdamW state stay fp32; the reference is held in bf16.
Either way the log-probabilities are taken in fp32 from the logits (``dpo.token_logps``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer

from trainer_client import checkpoint
from trainer_client.config import TrainConfig
from trainer_client.dpo import collate, dpo_loss, token_logps

if TYPE_CHECKING:
    from trainer_client.backends import GenerationBatch

log = logging.getLogger("trainer_client")


class NotFiniteError(RuntimeError):
    """A loss, gradient norm or weight is NaN or infinite: the trainer stops before it applies or pushes it,
    so the server keeps serving the last finite weights."""


def check_finite(state_dict: dict[str, torch.Tensor], advice: str) -> None:
    """Raise :class:`NotFiniteError` naming the tensors that hold NaN or Inf (one device sync if none do)."""
    floats = [n for n, t in state_dict.items() if t.is_floating_point()]
    finite = [torch.isfinite(state_dict[n]).all() for n in floats]
    if finite and not bool(torch.stack(finite).all()):
        bad = [n for n, ok in zip(floats, finite, strict=True) if not ok]
        names = ", ".join(bad[:3])
        raise NotFiniteError(f"the policy's weights hold NaN or Inf ({names}), not pushed; {advice}")


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def load_model(folder: str, dtype: torch.dtype, device: str):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)


def enable_gradient_checkpointing(model) -> None:
    """transformers' own activation checkpointing of every decoder layer (recomputed in the backward pass).

    transformers checkpoints a layer only in training mode. The policy stays in eval mode (no dropout: its
    log-probabilities must be those the server samples with); only the layers themselves, not their
    submodules, are switched to training mode, so dropout modules stay off. (A layer that applies dropout in
    its own forward, as OPT's does, would apply it: give such a model a dropout of 0 in its config.)"""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no checkpointable layers")
    for layer in layers:
        layer.training = True


@dataclass
class StepStats:
    """What one DPO step reports (None where the step had no pairs)."""

    loss: float | None  # mean loss over the pairs
    kl: float | None  # mean of log pi - log pi_ref over the completion tokens of the pairs
    reward_accuracy: float | None  # fraction of pairs with h > 0
    logratio_margin: float | None  # mean h = (pi_c - pi_r) - (ref_c - ref_r)
    grad_norm: float | None  # global gradient norm before clipping
    lr: float  # learning rate of this step


class Learner:
    """The policy (trained), the reference (frozen) and the optimizer; ``step`` is the policy version held
    (optimizer steps taken, from the checkpoint when resumed)."""

    def __init__(self, config: TrainConfig, resume: str | None = None):
        c = self.config = config
        self.precision = resolve_precision(c.precision, c.device)
        self.tokenizer = AutoTokenizer.from_pretrained(c.model)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        # --- models: policy in fp32 (master weights), reference frozen in the compute dtype ----------------
        ref_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.policy = load_model(resume or c.model, torch.float32, c.device)
        self.reference = load_model(c.ref_model or c.model, ref_dtype, c.device)
        self.policy.eval()  # no dropout: the log-probabilities must be those the server samples with
        self.reference.eval().requires_grad_(False)
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        check_finite(self.policy.state_dict(), f"check the model folder {resume or c.model}")

        # --- optimizer and schedule (restored with the step when resumed) ---------------------------------
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(c))
        self.step = 0
        if resume:
            self.step = checkpoint.load_trainer_state(resume, self.optimizer, self.scheduler)["step"]
            log.info("resumed from %s at step %d", resume, self.step)

    # ------------------------------------------------------------------------------------------------------
    # The DPO step
    # ------------------------------------------------------------------------------------------------------
    def train_step(self, samples: GenerationBatch, pairs: list[tuple[int, int, int]]) -> StepStats:
        """One optimizer step of the DPO loss over ``pairs`` [(prompt b, chosen k, rejected k)] of
        ``samples``, in micro-batches of ``micro_batch_size`` pairs. Without pairs no parameter has a
        gradient and the weights stay as they are; the schedule advances either way.

        Raises :class:`NotFiniteError` (the step not applied) if the loss or the gradient norm is not
        finite."""
        c, P = self.config, len(pairs)
        sums = dict(loss=0.0, margin=0.0, accuracy=0.0, kl_sum=0.0, kl_tokens=0)
        self.optimizer.zero_grad(set_to_none=True)
        mb = c.micro_batch_size or max(P, 1)
        for i in range(0, P, mb):  # gradients accumulate over the micro-batches
            chunk = pairs[i : i + mb]
            m = len(chunk)
            policy_tok, ref_tok, completion_mask = self._pair_token_logps(samples, chunk)  # (2m, T) each
            policy_logps, ref_logps = policy_tok.sum(-1), ref_tok.sum(-1)  # (2m,)
            chosen_logps, rejected_logps = policy_logps[:m], policy_logps[m:]  # (m,)
            ref_chosen_logps, ref_rejected_logps = ref_logps[:m], ref_logps[m:]  # (m,)
            losses = dpo_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, c.beta, c.loss
            )
            (losses.sum() / P).backward()  # the mean over all P pairs
            with torch.no_grad():
                h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (m,)
                sums["loss"] += losses.sum().item() / P
                sums["margin"] += h.sum().item() / P
                sums["accuracy"] += (h > 0).sum().item() / P
                sums["kl_sum"] += (policy_tok - ref_tok).sum().item()  # of log pi - log pi_ref
                sums["kl_tokens"] += int(completion_mask.sum().item())

        grad_norm = None
        if P:  # (an infinite max_norm only measures)
            max_norm = c.max_grad_norm if c.max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm).item()
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                raise NotFiniteError(
                    f"step {self.step + 1}: loss {sums['loss']}, gradient norm {grad_norm}; the step was not "
                    f"applied and nothing after version {self.step} is pushed. Lower learning_rate (or set "
                    "max_grad_norm) and resume from the last checkpoint"
                )
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return StepStats(
            loss=sums["loss"] if P else None,
            kl=sums["kl_sum"] / sums["kl_tokens"] if P else None,
            reward_accuracy=sums["accuracy"] if P else None,
            logratio_margin=sums["margin"] if P else None,
            grad_norm=grad_norm,
            lr=lr,
        )

    def _pair_token_logps(self, samples: GenerationBatch, pairs: list[tuple[int, int, int]]):
        """Completion-token log-probabilities of the policy (with gradient) and the reference, chosen rows
        then rejected rows: ``policy_tok``, ``ref_tok``, ``completion_mask``, each (2m, T)."""
        c = self.config
        prompt_ids = [samples.prompt_token_ids[b] for b, _, _ in pairs] * 2
        completion_ids = [samples.completions[b][kc].token_ids for b, kc, _ in pairs] + [
            samples.completions[b][kr].token_ids for b, _, kr in pairs
        ]  # (2m,)
        input_ids, attention_mask, completion_mask = (
            t.to(c.device) for t in collate(prompt_ids, completion_ids, self.pad_id)
        )  # (2m, T)
        bf16 = self.precision == "bf16"
        with torch.autocast(torch.device(c.device).type, dtype=torch.bfloat16, enabled=bf16):
            args = (input_ids, attention_mask, completion_mask, c.logprob_chunk_tokens)
            policy_tok = token_logps(self.policy, *args)
            with torch.no_grad():
                ref_tok = token_logps(self.reference, *args)
        return policy_tok, ref_tok, completion_mask

    # ------------------------------------------------------------------------------------------------------
    # Weights out: pushes and checkpoints
    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full tensors by name (live: the next step changes them; copy before pushing)."""
        return self.policy.state_dict()

    def save_checkpoint(self, path: str | Path, extra: dict) -> Path:
        """A Hugging Face folder of the policy (fp32) and tokenizer, plus what resuming needs (optimizer,
        scheduler, RNG, ``step``, ``extra``)."""
        return checkpoint.save_checkpoint(
            path, self.policy, self.tokenizer, self.optimizer, self.scheduler, self.step, extra
        )
