"""The learner on several ranks, without a server: run by ``torchrun`` from tests/test_distributed.py.

    torchrun --nproc-per-node 2 tests/dist_worker.py SPEC.json OUT.pt

For each case of SPEC (a config and a number of pairs) every rank builds the learner; rank 0 drives it
through its public calls (``train_step``, ``check_finite``, ``full_weights``, ``save_checkpoint``) while
the other ranks ``follow()``, then all ranks gather the gradients the step left behind. Rank 0 writes the
statistics, gradients and weights of every case to OUT; ``run_case`` computes the same in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer_client.backends import GenerationBatch
from trainer_client.client import Completion
from trainer_client.config import TrainConfig
from trainer_client.learner import Learner

PROMPTS = 5
"""Prompts of the test batch (3 samples each); a case's pairs are the first ``pairs`` of ``all_pairs``."""


def batch() -> GenerationBatch:
    """5 prompts x K=3 samples of random tokens, ragged lengths (padding in every micro-batch)."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 512, (n,), generator=generator).tolist()

    prompts = [tokens(n) for n in (5, 9, 3, 7, 4)]
    lengths = ((7, 12, 4), (10, 3, 8), (6, 6, 11), (5, 9, 2), (8, 4, 13))
    completions = [
        [Completion(text="", token_ids=tokens(n), logprobs=None, finish_reason="stop") for n in row]
        for row in lengths
    ]
    return GenerationBatch(0, [str(i) for i in range(PROMPTS)], prompts, completions)


def all_pairs() -> list[tuple[int, int, int]]:
    return [(0, 1, 2), (1, 0, 1), (2, 2, 0), (3, 1, 2), (4, 2, 1)]


def config(models: dict, case: dict) -> TrainConfig:
    base = dict(model=models["policy"], ref_model=models["reference"], learning_rate=1e-3, max_grad_norm=None)
    return TrainConfig(**base | case.get("config", {}))


STATS = ("loss", "kl", "reward_accuracy", "logratio_margin", "grad_norm", "lr")


def stats_dict(stats) -> dict:
    return {k: getattr(stats, k) for k in STATS}


def run_case(models: dict, case: dict) -> dict:
    """One process: the step's statistics, then its gradients and the updated weights."""
    learner = Learner(config(models, case))
    stats = learner.train_step(batch(), all_pairs()[: case["pairs"]])
    grads = {n: p.grad.clone() for n, p in learner.policy.named_parameters() if p.grad is not None}
    return {"stats": stats_dict(stats), "grads": grads, "weights": dict(learner.state_dict())}


def run_case_sharded(models: dict, case: dict, scratch: Path) -> dict | None:
    """Every rank: the same as ``run_case``, sharded; the result on rank 0, None elsewhere. With
    ``case["resume"]``: a checkpoint after the step, a second step, then the second step again from the
    checkpoint (its statistics must be those of the uninterrupted second step)."""
    from trainer_client.distributed import full_tensor

    learner = Learner(config(models, case))
    result = None
    if learner.is_main:
        stats = learner.train_step(batch(), all_pairs()[: case["pairs"]])
        learner.check_finite("(test)")
        weights = {name: t.clone() for name, t in learner.full_weights().items()}
        result = {"stats": stats_dict(stats), "weights": weights}
        if case.get("resume"):
            result["checkpoint"] = str(learner.save_checkpoint(scratch / "checkpoint-000001", {"case": 1}))
        learner.ranks.send("stop")  # (so that the ranks gather the gradients below together)
    else:
        learner.follow()
    grads = {n: full_tensor(p.grad) for n, p in learner.policy.named_parameters() if p.grad is not None}
    if result is not None:
        result["grads"] = grads
    if case.get("resume"):  # a second step, then the same second step resumed from the checkpoint
        second = []
        for resume in (None, str(scratch / "checkpoint-000001")):
            if resume:
                learner = Learner(config(models, case), resume=resume)
            if learner.is_main:
                second.append(stats_dict(learner.train_step(batch(), all_pairs()[:2])))
                learner.ranks.send("stop")
            else:
                learner.follow()
        if result is not None:
            result["second"] = second
    return result


def main(spec_path: str, out_path: str) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    results = [run_case_sharded(spec["models"], case, Path(spec["scratch"]) / str(i)) for i, case in
               enumerate(spec["cases"])]  # fmt: skip
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
