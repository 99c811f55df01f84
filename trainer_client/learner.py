"""The learner: the policy, the frozen reference, AdamW and the DPO step, on one device or sharded over ranks.

The training loop (train.py) gives it the samples of a step and their preference pairs and gets the step's
statistics back; it reads the weights to push with ``full_weights()`` and saves checkpoints through it. All
that concerns devices, precision, memory and ranks lives here and in distributed.py, so the loop sees no
collectives: it asks ``is_main`` once, and a rank other than 0 calls ``follow()`` instead of the loop.

Several ranks (``torchrun --nproc-per-node N -m trainer_client train ...``): each rank holds 1/N of the
policy, of its gradients and AdamW state, and of the reference (FSDP2's ``fully_shard`` per decoder layer,
then the rest), and trains on its share of each step's pairs. Rank 0's calls below tell the other ranks
what to do before all of them do it (distributed.py lists the commands): ``train_step`` hands them the
pairs' token ids, ``full_weights`` gathers full tensors bucket by bucket as a push or a checkpoint reads
them. The reference is sharded as well (no gradients): it costs one more all-gather per forward, and saves
(N-1)/N of a model's memory on every rank.

Precision (``config.precision``):
    fp32  weights, activations, gradients and AdamW state in float32; TF32 stays off (torch's default), so
          fp32 is the exact reference the other settings are measured against.
    bf16  forward and backward under ``torch.autocast(bfloat16)`` (on several ranks FSDP2 also gathers the
          weights in bf16: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), while the weights
          (master weights), gradients and AdamW state stay fp32; the reference is held in bf16.
Either way the log-probabilities are taken in fp32 from the logits (``dpo.token_logps``).

``cuda_graphs`` (one process on a GPU): each micro-batch's policy forward and backward, and the reference's
forward, are replayed from CUDA graphs (graphs.py), on micro-batches padded to a few shapes.

LoRA (``lora_rank > 0``, lora.py; one process): the policy is a frozen base in the compute dtype with fp32
peft adapters, the only trainable tensors; the reference is the same model with the adapters switched off
(inside the step), a push sends the adapters (``adapter_weights``) or the merged weights (``full_weights``),
and a checkpoint is peft's adapter folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed import ReduceOp
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer

from generator_server.gguf_model import resolve_model
from trainer_client import checkpoint, distributed, lora
from trainer_client.config import TrainConfig
from trainer_client.distributed import DistributedError, Ranks
from trainer_client.dpo import auto_chunk_tokens, auto_chunks_for, collate, dpo_loss, token_logps
from trainer_client.graphs import CudaGraphs, bucket

if TYPE_CHECKING:
    from trainer_client.backends import GenerationBatch

log = logging.getLogger("trainer_client")
Rows = list[tuple[list[int], list[int], list[int]]]
"""The token ids of preference pairs: (prompt, chosen completion, rejected completion) per pair."""
Pairs = list[tuple[int, int, int]]
"""Preference pairs of a batch: (prompt b, chosen sample k, rejected sample k) per pair."""


class NotFiniteError(RuntimeError):
    """A loss, gradient norm or weight is NaN or infinite: the trainer stops before it applies or pushes it,
    so the server keeps serving the last finite weights."""


def nonfinite(tensors: list[torch.Tensor]) -> list[bool]:
    """Which of ``tensors`` (floating, on one device) hold a NaN or an Inf, with one device sync.

    The largest magnitude of a tensor is NaN or Inf exactly when it holds one; ``_foreach_norm`` (what
    ``clip_grad_norm_`` uses) takes them all in a few kernels, where ``isfinite(t).all()`` launches five per
    tensor: the check before each push of a 24-layer model took 12.7 ms that way on an H200, now 4.3 ms
    (``bench/learner_step.py --loop``), most of it launching kernels."""
    flags = [False] * len(tensors)
    full = [i for i, t in enumerate(tensors) if t.numel()]  # (an empty shard has no largest magnitude)
    if full:
        peaks = torch._foreach_norm([tensors[i] for i in full], ord=math.inf)
        bad = torch.isfinite(torch.stack([p.float() for p in peaks])).logical_not().tolist()
        for i, flag in zip(full, bad, strict=True):
            flags[i] = flag
    return flags


def check_finite(state_dict: dict[str, torch.Tensor], advice: str) -> None:
    """Raise :class:`NotFiniteError` naming the tensors that hold NaN or Inf."""
    floats = [n for n, t in state_dict.items() if t.is_floating_point()]
    flags = nonfinite([state_dict[n] for n in floats])
    if any(flags):
        raise not_finite([n for n, flag in zip(floats, flags, strict=True) if flag], advice)


def not_finite(names: list[str], advice: str) -> NotFiniteError:
    names = ", ".join(names[:3])
    return NotFiniteError(f"the policy's weights hold NaN or Inf ({names}), not pushed; {advice}")


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


def decoder_layers(model) -> list[nn.Module]:
    """transformers' decoder layers (the unit of gradient checkpointing and of FSDP2 sharding)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_gradient_checkpointing(model) -> None:
    """transformers' own activation checkpointing of every decoder layer (recomputed in the backward pass).

    transformers checkpoints a layer only in training mode. The policy stays in eval mode (no dropout: its
    log-probabilities must be those the server samples with); only the layers themselves, not their
    submodules, are switched to training mode, so dropout modules stay off. (A layer that applies dropout in
    its own forward, as OPT's does, would apply it: give such a model a dropout of 0 in its config.)"""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no checkpointable layers")
    for layer in layers:
        layer.training = True


def pair_rows(samples: GenerationBatch, pairs: Pairs) -> Rows:
    """The token ids of ``pairs`` [(prompt b, chosen k, rejected k)] of ``samples``."""
    prompts, completions = samples.prompt_token_ids, samples.completions
    return [(prompts[b], completions[b][kc].token_ids, completions[b][kr].token_ids) for b, kc, kr in pairs]


class LogProbs(nn.Module):
    """``dpo.token_logps`` of a causal LM as one module. Sharded, it is FSDP2's root: the log-probabilities
    (chunked or not) run inside the root's forward, with its parameters (embeddings, final norm, lm_head)
    gathered, and their gradients reduced after its backward."""

    def __init__(self, model, chunk_tokens: int, auto: bool = False):
        super().__init__()
        self.model, self.chunk_tokens, self.auto = model, chunk_tokens, auto
        self.vocab = model.config.get_text_config().vocab_size

    def forward(self, input_ids, attention_mask, mask):  # (B, T) each -> (B, T)
        chunk = self.chunk_tokens
        if self.auto and chunk:  # (logprob_chunk_tokens: auto) the plain path for small batches on a GPU
            chunk = auto_chunks_for(chunk, input_ids.device.type, input_ids.numel(), self.vocab)
        return token_logps(self.model, input_ids, attention_mask, mask, chunk)


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
        self.ranks: Ranks | None = None
        self.inside: str | None = None  # the command rank 0 is running with the other ranks
        if distributed.world_size() > 1:
            if c.mode == "colocate":
                raise ValueError("mode: colocate runs in one process; launch it without torchrun")
            if c.lora_rank:
                raise ValueError(
                    "lora_rank > 0 runs in one process; launch it without torchrun (sharding the adapters "
                    "over ranks with FSDP2 is not implemented; with LoRA an 8B model trains on one 80 GB GPU)"
                )
            self.ranks = Ranks.start(c.device, c.dist_timeout_seconds)
        try:
            self._build(resume)
        except BaseException:
            if self.ranks is not None:  # every rank fails the same way here: nobody to tell
                self.ranks.close()
            raise

    def _build(self, resume: str | None) -> None:
        c, ranks = self.config, self.ranks
        self.rank, self.world_size = (ranks.rank, ranks.world_size) if ranks else (0, 1)
        self.device = ranks.device if ranks else c.device
        self.precision = resolve_precision(c.precision, self.device)
        state = checkpoint.read_trainer_state(resume, self.world_size) if resume else None  # (fail fast)
        # a GGUF file becomes its converted folder (cached; the server serving the file reads the same one)
        model_dir = resolve_model(c.model)
        ref_dir = resolve_model(c.ref_model) if c.ref_model else model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        # --- models: policy in fp32 (master weights), reference frozen in the compute dtype ----------------
        ref_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        where = "cpu" if ranks else self.device  # sharded: fully_shard moves each rank's shard to its device
        self.lora = c.lora_rank > 0
        if resume and lora.is_lora_checkpoint(resume) != self.lora:
            held = "a whole model" if self.lora else "LoRA adapters"
            raise ValueError(f"checkpoint {resume} holds {held}; this run has lora_rank {c.lora_rank}")
        if self.lora:  # (lora.py) a frozen base in the compute dtype, fp32 adapters on it
            self.policy = lora.add_adapters(load_model(model_dir, ref_dtype, where), c, resume)
            self.net = self.policy.get_base_model()  # the adapted model: its forward runs the adapters
            # the reference: this very base with the adapters off, unless ref_model names another model
            self.reference = load_model(ref_dir, ref_dtype, where) if c.ref_model else None
        else:
            self.policy = self.net = load_model(resume or model_dir, torch.float32, where)
            self.reference = load_model(ref_dir, ref_dtype, where)
        self.policy.eval()  # no dropout: the log-probabilities must be those the server samples with
        if self.lora:
            lora.train_dropout(self.policy)  # (lora_dropout: the adapters' own dropout, training only)
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(self.net)
        check_finite(self.policy.state_dict(), f"check the model folder {resume or c.model}")
        on_gpu = torch.device(self.device).type == "cuda"
        self.side_stream = torch.cuda.Stream(self.device) if on_gpu and not ranks else None
        """The CUDA stream ``reference_pair_logps`` runs on, beside the step's (one process on a GPU)."""
        chunk, auto = c.logprob_chunk_tokens, c.logprob_chunk_tokens == "auto"
        if auto:
            chunk = 0 if c.cuda_graphs else auto_chunk_tokens(self.net)
        self.policy_logps = LogProbs(self.net, chunk, auto)
        if self.reference is not None:
            self.reference_logps = LogProbs(self.reference, chunk, auto)
        else:  # LoRA: the policy's own forward with its adapters switched off
            self.reference_logps = lora.AdaptersOff(self.policy, LogProbs(self.net, chunk, auto))
        if ranks:
            compute = torch.bfloat16 if self.precision == "bf16" else None
            for model, root in ((self.policy, self.policy_logps), (self.reference, self.reference_logps)):
                distributed.shard(root, decoder_layers(model), ranks.mesh, param_dtype=compute)

        # --- optimizer and schedule (restored with the step when resumed) ---------------------------------
        # Fused AdamW on one GPU: a few kernels for the whole update instead of a dozen per group of tensors
        # (a step at online DPO's small shapes is bound by launching kernels). Sharded, the default foreach
        # implementation, which FSDP2's DTensors are tested with here.
        self.fused_adamw = ranks is None and torch.device(self.device).type == "cuda"
        # (after sharding, which replaces the parameters; LoRA: the adapters only)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=c.learning_rate, weight_decay=c.weight_decay,
            fused=self.fused_adamw or None,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(c))
        self.step = 0
        if state is not None:
            if ranks:
                with ranks.watch("loading the optimizer state"):
                    folder = Path(resume, checkpoint.OPTIMIZER_DIR)
                    distributed.load_optimizer(self.policy, self.optimizer, str(folder))
            checkpoint.restore_trainer_state(state, None if ranks else self.optimizer, self.scheduler)
            for group in self.optimizer.param_groups:  # (a checkpoint's own choice came back with its state)
                group["fused"], group["foreach"] = self.fused_adamw or None, None
            self.step = state["step"]
            log.info("resumed from %s at step %d", resume, self.step)

        # --- CUDA graphs (graphs.py): fixed shapes, so micro-batches are padded ----------------------------
        self.graphs: CudaGraphs | None = None  # of the step's micro-batches (the training thread)
        self.reference_graphs: CudaGraphs | None = None  # of the reference's forward (whichever thread)
        self.pad_shapes = False
        """Pad each micro-batch to a bucket of pairs and tokens (what a graph's fixed shapes need)."""
        if c.cuda_graphs:
            if ranks or not on_gpu:
                raise ValueError(
                    "cuda_graphs: needs one process on a CUDA device (not torchrun, not the CPU); "
                    "set cuda_graphs: false"
                )
            self.graphs = CudaGraphs(self._micro_batch, self.device)
            self.reference_graphs = CudaGraphs(self._reference_sums, self.device)
            self.pad_shapes = True

    @property
    def is_main(self) -> bool:
        """The rank that runs the loop: generates, scores, pushes, logs and writes (the only process, or
        rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------------
    # The DPO step
    # ------------------------------------------------------------------------------------------------------
    def memory_metrics(self) -> dict:
        """Peak GPU memory of this process so far (on a GPU; nothing on the CPU)."""
        if torch.device(self.device).type != "cuda":
            return {}
        return {"gpu_peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)}

    def train_step(
        self, samples: GenerationBatch, pairs: Pairs, reference: torch.Tensor | None = None
    ) -> StepStats:
        """One optimizer step of the DPO loss over ``pairs`` [(prompt b, chosen k, rejected k)] of
        ``samples``, in micro-batches of ``micro_batch_size`` pairs. Without pairs no parameter has a
        gradient and the weights stay as they are; the schedule advances either way. ``reference``: the
        pairs' ``reference_pair_logps``, taken ahead (one process); without it the step takes them.

        Raises :class:`NotFiniteError` (the step not applied) if the loss or the gradient norm is not
        finite."""
        rows = pair_rows(samples, pairs)
        with self._together("step", rows):
            return self._train_step(rows, reference)

    @property
    def reference_ahead(self) -> bool:
        """Whether the reference's log-probabilities of a step's pairs can be taken ahead of the step, in
        another thread (``reference_pair_logps``): in one process. Sharded, the reference's forward is a
        collective of all ranks, and stays inside the step. With LoRA and no ``ref_model``, the reference is
        the policy with its adapters switched off, a switch the step running in the other thread would see:
        it stays inside the step too."""
        return self.ranks is None and self.reference is not None

    def reference_pair_logps(self, samples: GenerationBatch, pairs: Pairs) -> torch.Tensor:
        """The reference's log-probabilities of each pair's chosen and rejected completion (summed over the
        completion's tokens), (P, 2) float64 on the CPU, taken in the micro-batches the step uses.

        Made to run in the producer thread while the training thread runs the previous step: it touches
        only the frozen reference, on a CUDA stream of its own, so its kernels interleave with the step's
        (a step at small shapes is bound by launching kernels, and this takes its reference forward off
        that path). Its activations may then meet the step's in GPU memory."""
        if not self.reference_ahead:
            raise RuntimeError("sharded: the reference's forward runs inside the step, on every rank")
        rows = pair_rows(samples, pairs)
        mb = self.config.micro_batch_size or max(len(rows), 1)
        out = torch.zeros(len(rows), 2, dtype=torch.float64)
        side = torch.cuda.stream(self.side_stream) if self.side_stream is not None else nullcontext()
        with side:
            for i in range(0, len(rows), mb):
                m = len(rows[i : i + mb])
                ref_logps = self._reference(*self._pair_inputs(rows[i : i + mb])).view(2, -1)  # (2, m')
                out[i : i + m] = ref_logps[:, :m].T.cpu()  # (m, 2) (padded with pad_shapes: m' >= m)
        return out

    def _train_step(self, rows: Rows, reference: torch.Tensor | None = None) -> StepStats:
        """The step on every rank: rank r takes rows[r::world]. Each rank's loss is divided by the pair
        count of all ranks, P, and FSDP sums the ranks' gradients, so the gradient is the one-rank gradient
        of the mean loss over the P pairs. All ranks run the same number of micro-batches (FSDP's
        collectives must pair up); a rank out of pairs runs a pair with weight 0 instead."""
        c, P = self.config, len(rows)
        mine = rows[self.rank :: self.world_size]  # this rank's share: P // world pairs, or one more
        share = -(-P // self.world_size)  # ceil(P / world): the largest share
        mb = c.micro_batch_size or max(share, 1)
        micro_batches = -(-share // mb)  # the same on every rank
        # the step's statistics, summed on the device and read once at the end (each read waits for the GPU)
        names = ("loss", "margin", "accuracy", "kl_sum", "kl_tokens")
        totals = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        # (graphs write the gradients where they were recorded: zeroed in place, never freed)
        self.optimizer.zero_grad(set_to_none=self.graphs is None)
        micro_batch = self.graphs if self.graphs is not None else self._micro_batch
        with self._collectives("the DPO step"):
            for i in range(micro_batches):  # gradients accumulate over the micro-batches
                chunk = mine[i * mb : (i + 1) * mb]
                idle = not chunk  # no pairs left here: a pair of weight 0 keeps this rank in the collectives
                chunk = chunk or rows[:1]
                inputs = self._pair_inputs(chunk)  # input_ids, attention_mask, completion_mask: (2m, T)
                m = inputs[0].shape[0] // 2  # (padded: more than len(chunk), the rest of weight 0)
                weights = torch.zeros(m, dtype=torch.float64)
                weights[: len(chunk)] = 0.0 if idle else 1.0 / P  # the mean over all P pairs
                if reference is None:
                    ref_logps = self._reference(*inputs)
                else:  # taken ahead: (m, 2) rows of (chosen, rejected)
                    ahead = torch.zeros(m, 2, dtype=torch.float64)
                    ahead[: len(chunk)] = reference[i * mb : (i + 1) * mb]
                    ref_logps = ahead.T.reshape(-1).to(self.device)  # (2m,): chosen, then rejected
                stats = micro_batch(*inputs, ref_logps, weights.to(self.device))
                if not idle:
                    totals += stats

            if P:  # (an infinite max_norm only measures)
                max_norm = c.max_grad_norm if c.max_grad_norm is not None else math.inf
                norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
                norm = distributed.full_tensor(norm).double().reshape(1)  # (sharded: a replicated DTensor)
                totals = torch.cat([totals, norm])
            values = totals.tolist()  # the step's one read from the device
            grad_norm = values.pop() if P else None
            sums = dict(zip(names, values, strict=True))
            if self.ranks:  # the sums over all ranks' pairs: every rank reports the one-rank statistics
                sums = dict(zip(sums, self.ranks.all_reduce(list(sums.values())), strict=True))
            if P and not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                raise NotFiniteError(
                    f"step {self.step + 1}: loss {sums['loss']}, gradient norm {grad_norm}; the step was "
                    f"not applied and nothing after version {self.step} is pushed. Lower learning_rate "
                    "(or set max_grad_norm) and resume from the last checkpoint"
                )
            if P:  # (no pairs: no gradient, as eager AdamW skips parameters without one)
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

    @property
    def _reference(self):
        return self.reference_graphs if self.reference_graphs is not None else self._reference_sums

    @torch.no_grad()
    def _reference_sums(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
    ) -> torch.Tensor:
        """The reference's log-probabilities of (2m, T) inputs summed over the completion tokens, (2m,) fp64
        (the KL is a small difference of the policy's and the reference's sums). (Replayed from CUDA graphs
        with ``cuda_graphs``.)"""
        inputs = (input_ids, attention_mask, completion_mask)
        return self._logps(self.reference_logps, inputs).sum(-1, dtype=torch.float64)

    def _micro_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        ref_logps: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """The policy's forward, the DPO loss and its backward on one micro-batch of m pairs: (2m, T)
        inputs (the chosen completions, then the rejected ones), the reference's summed log-probabilities
        ``ref_logps`` (2m,), and each pair's ``weights`` (m,): 1/P, or 0 for padding. The gradients
        accumulate. Returns the statistics (5,): weighted loss, margin and accuracy, the sum of
        log pi - log pi_ref over the completion tokens, and their count. (Replayed from CUDA graphs with
        ``cuda_graphs``: no host sync in here.)"""
        c, m = self.config, weights.shape[0]
        inputs = (input_ids, attention_mask, completion_mask)
        # (2m,) summed in fp64: the KL below is a small difference of the policy's and the reference's sums
        policy_logps = self._logps(self.policy_logps, inputs).sum(-1, dtype=torch.float64)
        chosen_logps, rejected_logps = policy_logps[:m], policy_logps[m:]  # (m,)
        ref_chosen_logps, ref_rejected_logps = ref_logps[:m], ref_logps[m:]  # (m,)
        losses = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, c.beta, c.loss)
        (losses * weights).sum().backward()
        with torch.no_grad():
            h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (m,)
            return torch.stack([
                (losses * weights).sum(),
                (h * weights).sum(),
                ((h > 0) * weights).sum(),
                (policy_logps - ref_logps).sum(),  # of log pi - log pi_ref over the completion tokens
                completion_mask.sum(),
            ]).double()  # fmt: skip

    def _pair_inputs(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``completion_mask`` of ``rows`` on the device, each (2m, T):
        the m chosen completions, then the m rejected ones, after their prompts. With ``pad_shapes``, m
        and T are rounded up to buckets: padding pairs of one pad token and no completion, padding tokens
        after each sequence's end."""
        T = 0  # (collate's own: the longest row)
        prompts, chosen, rejected = [p for p, _, _ in rows], [c for _, c, _ in rows], [r for _, _, r in rows]
        if self.pad_shapes:
            m, T = bucket(len(rows)), bucket(max(len(p) + max(len(c), len(r)) for p, c, r in rows), 16)
            padding = m - len(rows)
            prompts += [[self.pad_id]] * padding
            chosen += [[]] * padding
            rejected += [[]] * padding
        input_ids, attention_mask, completion_mask = collate(prompts * 2, chosen + rejected, self.pad_id, T)
        return input_ids.to(self.device), attention_mask.to(self.device), completion_mask.to(self.device)

    def _logps(self, logps: LogProbs, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Completion-token log-probabilities (2m, T) of ``logps`` (the policy's or the reference's) on
        ``inputs``, in the run's precision."""
        bf16 = self.precision == "bf16"
        # (no cast cache: each weight is cast once per forward anyway, and a graph must not keep one)
        autocast = torch.autocast(
            torch.device(self.device).type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False
        )
        with autocast:
            return logps(*inputs)

    # ------------------------------------------------------------------------------------------------------
    # Weights out: pushes and checkpoints
    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's tensors by name, live: full tensors in one process, this rank's shards (DTensors,
        whose shapes are the full ones) on several ranks, where ``full_weights()`` gathers them. (LoRA: the
        base's and the adapters' tensors, as peft names them.)"""
        return self.policy.state_dict()

    def tensor_specs(self) -> dict[str, tuple[list[int], int]]:
        """The policy's tensors as the model folder names them: name -> (full shape, storage key); tied
        tensors share a storage key. (LoRA: the base's tensors, which a merged push sends.)"""
        state = lora.base_tensors(self.policy) if self.lora else self.policy.state_dict()
        return {n: (list(t.shape), distributed.local_tensor(t).data_ptr()) for n, t in state.items()}

    def adapter_weights(self) -> tuple[dict[str, torch.Tensor], dict]:
        """LoRA: the adapters' tensors (live, fp32; named as in peft's adapter_model.safetensors) and their
        adapter_config.json (lora.wire_config): what an adapter push sends."""
        return lora.adapter_tensors(self.policy), lora.wire_config(self.policy)

    def check_finite(self, advice: str) -> None:
        """Raise :class:`NotFiniteError` naming the policy's tensors that hold NaN or Inf."""
        with self._together("finite"):
            self._check_finite(advice)

    def _check_finite(self, advice: str) -> None:
        # (LoRA: the adapters only; the frozen base was checked once, when loaded)
        state = lora.adapter_tensors(self.policy) if self.lora else self.policy.state_dict()
        if self.ranks is None:
            return check_finite(state, advice)
        floats = [n for n, t in state.items() if t.is_floating_point()]  # each rank checks its shards
        bad = nonfinite([distributed.local_tensor(state[n]) for n in floats])
        flags = self.ranks.all_reduce([float(flag) for flag in bad], op=ReduceOp.MAX)
        if any(flags):
            raise not_finite([n for n, flag in zip(floats, flags, strict=True) if flag], advice)

    def full_weights(self, names: Iterable[str] | None = None) -> Mapping[str, torch.Tensor]:
        """The policy's full tensors by name (``names``, default all; live: the next step changes them, copy
        before pushing). On several ranks (rank 0 only): a mapping that gathers them as they are read,
        ``gather_bucket_mib`` at a time along the order of ``names`` (read them in that order). LoRA: the
        base with the adapters merged in (fp32), each merged tensor computed as it is read."""
        if self.lora:
            return lora.MergedWeights(self.policy)
        state = self.policy.state_dict()
        if self.ranks is None:
            return state if names is None else {name: state[name] for name in names}
        buckets = distributed.buckets(state, names or state, self.config.gather_bucket_mib * 2**20)
        return distributed.FullTensors(buckets, self._gather_main)

    def _gather_main(self, names: list[str]) -> dict[str, torch.Tensor]:
        with self._together("gather", names):
            return self._gather(names)

    def _gather(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = self.policy.state_dict()
        with self.ranks.watch("gathering the policy's weights"):
            return {name: distributed.full_tensor(state[name]) for name in names}

    def save_checkpoint(self, path: str | Path, extra: dict) -> Path:
        """A Hugging Face folder of the policy (fp32) and tokenizer, plus what resuming needs (optimizer,
        scheduler, RNG, ``step``, ``extra``). LoRA: peft's adapter folder (fp32 adapters) in place of the
        model's weights."""
        if self.ranks is None:
            return checkpoint.save_checkpoint(
                path, self.policy, self.tokenizer, self.optimizer, self.scheduler, self.step, extra
            )
        specs, seen = {}, set()
        for name, t in self.policy.state_dict().items():
            storage = distributed.local_tensor(t).data_ptr()
            if storage not in seen:  # a tied tensor is written once, under its first name
                seen.add(storage)
                specs[name] = (t.dtype, tuple(t.shape))
        weights = self.full_weights(sorted(specs))  # (the order the file is written in)
        return checkpoint.save_sharded_checkpoint(
            path, self.policy, self.tokenizer, weights, specs, self._save_optimizer_main, self.scheduler,
            self.step, extra, self.world_size,
        )  # fmt: skip

    def _save_optimizer_main(self, folder: Path) -> None:
        with self._together("save", str(folder)):
            self._save_optimizer(str(folder))

    def _save_optimizer(self, folder: str) -> None:
        with self.ranks.watch("writing the optimizer state"):
            distributed.save_optimizer(self.policy, self.optimizer, folder)

    # ------------------------------------------------------------------------------------------------------
    # Ranks other than 0
    # ------------------------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Do what rank 0's learner asks (steps, checks, gathers, checkpoints) until it stops the run; raise
        :class:`DistributedError` if it stopped on an error (the message says which)."""
        handlers = {
            "step": self._train_step,
            "finite": lambda _: self._check_finite(""),
            "gather": self._gather,
            "save": self._save_optimizer,
        }
        while True:
            command, arg = self.ranks.receive()
            if command == "stop":
                if arg is not None:
                    raise DistributedError(f"rank {self.rank}: rank 0 stopped the run: {arg}")
                return
            try:
                handlers[command](arg)
            except NotFiniteError:
                pass  # every rank found it; rank 0 raises it and then stops the run

    def close(self, error: BaseException | None = None) -> None:
        """The end of the run. Rank 0 tells the other ranks to stop (and why, if it stops on ``error``);
        every rank leaves the process group."""
        if self.ranks is None:
            return
        # (not after a lost rank, nor from inside a command the others are still in: they could not hear it)
        if self.is_main and self.inside is None and not isinstance(error, DistributedError):
            try:
                self.ranks.send("stop", None if error is None else f"{type(error).__name__}: {error}")
            except DistributedError:
                pass
        self.ranks.close()
        self.ranks = None

    @contextmanager
    def _together(self, command: str, arg=None) -> Iterator[None]:
        """Rank 0: tell the other ranks to join in ``command``, then do it with them (one process: just do
        it). ``inside`` names it until it is done; a NotFiniteError is raised on every rank alike."""
        if self.ranks is not None:
            self.ranks.send(command, arg)
        self.inside = command
        try:
            yield
        except NotFiniteError:
            self.inside = None
            raise
        self.inside = None

    def _collectives(self, doing: str):
        return self.ranks.watch(doing) if self.ranks is not None else nullcontext()
