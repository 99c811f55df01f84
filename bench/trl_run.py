"""TRL's side of ``bench/vs_trl.py``: one online DPO run with TRL's ``OnlineDPOTrainer`` (experimental).

    python bench/trl_run.py --model STARTER --out DIR --steps 300 --batch-size 64 --learning-rate 2.5e-5 \
        --seed 0 [--vllm]

Runs in its own process, so ``bench/vs_trl.py`` can start it with another interpreter (``--trl-python``: a
virtual environment whose torch/transformers TRL accepts). It imports only the task module of this project
(pure Python), so that environment needs TRL and its dependencies, not this project's. With ``--task``
(``bench/real_task.py``: a reasoning-gym task) it loads the task as the trainer does, prompts rendered with
the model's chat template and the task's verifier as the reward: that needs this project's task modules and
the task's package too.

Kept the same as this project's trainer (``trainer_client/train.py``, ``trainer_client/learner.py``):

- the policy and the reference are the starter folder (TRL copies the policy as its reference);
- the prompts: step s trains on exactly ``ArithmeticTask.train_prompts(s, batch_size, seed)``, the batch our
  trainer draws at step s (the dataset is those batches in order, read with the sequential sampler);
- the reward: the task's exact match, as a callable;
- sigmoid DPO loss with the same beta, the mean over the step's pairs; AdamW (torch's, betas 0.9/0.999,
  eps 1e-8, no weight decay), constant learning rate, no warm-up, gradient norm clipped at 1.0; float32 on
  a CPU, bf16 autocast over float32 weights on a GPU (our ``precision: auto``);
- sampling at temperature 1, no top-k/top-p, the same max new tokens.

What TRL does its own way (and cannot be set): two completions per prompt, and every prompt gives a pair, the
first completion being "chosen" when the two rewards tie (our trainer skips prompts whose samples all tie).

The prompts carry the beginning-of-sequence token in their text for transformers generation: TRL tokenizes
prompts with ``add_special_tokens=False``, and the starter was trained (and is served by vLLM) with one.
vLLM adds it itself, so with ``--vllm`` the prompts are left bare.

Prints one JSON line (prefixed ``TRL_RESULT``) with the timings, and saves the final policy as a Hugging Face
folder in ``OUT/final`` for ``trainer-client eval``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_client.tasks.arithmetic import ArithmeticTask, exact_match_reward  # noqa: E402

RESULT_PREFIX = "TRL_RESULT "


def exact_match(prompts, completions, bos: str = "", **_) -> list[float]:
    """The task's reward with TRL's ``reward_funcs`` signature (batch of texts in, one float each out)."""
    return [exact_match_reward(p.removeprefix(bos), c) for p, c in zip(prompts, completions, strict=True)]


def step_prompts(task, steps: int, batch_size: int, seed: int) -> list[str]:
    """The prompts of steps 1..steps in order: what our trainer draws (``trainer_client/workers.py``)."""
    return [p for step in range(1, steps + 1) for p in task.train_prompts(step, batch_size, seed)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="starter folder (policy and reference)")
    parser.add_argument("--out", required=True, type=Path, help="output folder; the final model in OUT/final")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="prompts per step")
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo"])
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--task", default="arithmetic",
        help="a task as the trainer's `task` takes it (e.g. reasoning-gym:chain_sum; needs this project)",
    )  # fmt: skip
    parser.add_argument(
        "--task-options", type=json.loads, default={}, help="the trainer's task_options (JSON)"
    )
    parser.add_argument("--missing-eos-penalty", type=float, default=None)
    parser.add_argument("--vllm", action="store_true", help="generate with vLLM colocated (use_vllm)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--vllm-gpu-memory-utilization", type=float, default=0.3,
        help="--vllm on a GPU: the engine's share (this project's colocate_gpu_memory_utilization default)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    t_setup = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.task == "arithmetic":
        bos = "" if args.vllm else tokenizer.bos_token
        task = ArithmeticTask()
    else:  # a task of this project's (chat prompts rendered with the model's template, the task's verifier)
        from trainer_client.tasks import GymSettings, load_task

        bos = ""
        task = load_task(args.task, tokenizer=tokenizer, gym=GymSettings(options=args.task_options))
    prompts = [bos + p for p in step_prompts(task, args.steps, args.batch_size, args.seed)]
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(prompts, completions, **kwargs):
        if args.task == "arithmetic":
            return exact_match(prompts, completions, bos=bos)
        return [float(task.reward(p, c)) for p, c in zip(prompts, completions, strict=True)]

    reward.__name__ = "exact_match" if args.task == "arithmetic" else "task_reward"

    config = OnlineDPOConfig(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=args.beta,
        loss_type=args.loss,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        missing_eos_penalty=args.missing_eos_penalty,
        # prompt + completion; TRL sizes its vLLM engine to max_length + max_new_tokens
        max_length=model.config.max_position_embeddings - args.max_new_tokens,
        train_sampling_strategy="sequential",
        use_cpu=not torch.cuda.is_available(),
        # this project's `precision: auto`: bf16 autocast with fp32 weights on a GPU, fp32 on a CPU
        bf16=torch.cuda.is_available(),
        fp16=False,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, args.steps // 10),
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_vllm=args.vllm,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=False,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
    )

    class StepClock(TrainerCallback):
        """Wall time of the training loop and of every step, as the trainer sees them."""

        def __init__(self):
            self.begin = self.end = None
            self.step_ends: list[float] = []

        def on_train_begin(self, *a, **k):
            self.begin = time.monotonic()

        def on_step_end(self, *a, **k):
            self.step_ends.append(time.monotonic())

        def on_train_end(self, *a, **k):
            self.end = time.monotonic()

    clock = StepClock()
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    setup_seconds = time.monotonic() - t_setup
    trainer.train()
    final = args.out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    steps = [b - a for a, b in zip([clock.begin, *clock.step_ends], clock.step_ends, strict=False)]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "generation": "vllm (colocate)" if args.vllm else "transformers",
        "steps": len(clock.step_ends),
        "train_wall_seconds": clock.end - clock.begin,
        "step_seconds": steps,
        "setup_seconds": setup_seconds,
        "peak_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_model": str(final),
        "last_log": logs[-1] if logs else None,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
