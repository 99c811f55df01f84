"""The trainer's DPO step alone, per model size, precision and activation checkpointing: time and memory.

No server: the learner (``trainer_client/learner.py``, exactly what the training loop calls) takes one
step's samples, built here at a fixed shape (``--pairs`` preference pairs of a ``--prompt-tokens`` prompt
and two ``--completion-tokens`` completions each, the issue's 16 pairs of about 160 tokens by default), and
runs ``train_step`` (policy forward and backward, reference forward, AdamW) ``--steps`` times after one
warm-up step. Reports seconds per step, peak GPU memory (``torch.cuda.max_memory_allocated``) and the
achieved rate: 6 x params FLOP per token for the policy, 2 x for the reference, 2 x more for the
recomputation under checkpointing; a size that does not fit is reported as out of memory, so the table
shows the largest size that trains on the card in each setting.

``--loop`` times what the training loop does per step on one GPU with ``push: ipc``, phase by phase: the
step, the finite-weights check, and the snapshot into CUDA IPC buckets (``IpcTransport.snapshot``); the
three back to back without a sync between them, as the loop runs them; and the same with
``reference_ahead``, the reference's log-probabilities taken in another thread beside the step.
``--profile DIR`` writes where the CPU time of the timed steps goes (``torch.profiler``, by operator) and
counts the kernels a step launches.
At the small shapes of an online DPO run (tens of short sequences) a step is bound by launching kernels,
not by the card: these two options show where that time goes.

    PYTHONPATH=$PWD python bench/learner_step.py --sizes 1b 3b --settings bf16 bf16+gc fp32
    PYTHONPATH=$PWD python bench/learner_step.py --sizes 300m --settings bf16 bf16+graphs --pairs 18 \
        --prompt-tokens 10 --completion-tokens 4 --steps 20 --loop --profile runs/bench/profile
"""

from __future__ import annotations

import argparse
import gc
import random
import threading
import time
from pathlib import Path

from bench.common import (
    DEFAULT_WORK_DIR,
    SIZES,
    build_model,
    count_params,
    describe_machine,
    human_params,
    machine_line,
    markdown_table,
    median,
    write_results,
)

SETTINGS = {  # name -> (precision, gradient_checkpointing, cuda_graphs)
    "fp32": ("fp32", False, False),
    "bf16": ("bf16", False, False),
    "bf16+gc": ("bf16", True, False),
    "bf16+graphs": ("bf16", False, True),
}


def synthetic_batch(pairs: int, prompt_tokens: int, completion_tokens: int, vocab: int, seed: int):
    from trainer_client.backends import GenerationBatch
    from trainer_client.client import Completion

    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(4, vocab) for _ in range(n)]

    prompts = [ids(prompt_tokens) for _ in range(pairs)]
    completions = [
        [
            Completion(text="", token_ids=ids(completion_tokens), logprobs=None, finish_reason="length")
            for _ in range(2)
        ]
        for _ in range(pairs)
    ]
    batch = GenerationBatch(weights_version=0, prompts=[""] * pairs, prompt_token_ids=prompts,
                            completions=completions)  # fmt: skip
    return batch, [(b, 0, 1) for b in range(pairs)]


def measure(size: str, setting: str, args) -> dict:
    import torch

    from trainer_client.config import TrainConfig
    from trainer_client.learner import Learner

    precision, checkpointing, graphs = SETTINGS[setting]
    model_dir = build_model(size, "bfloat16", args.work_dir / "models")
    params = count_params(SIZES[size])
    row = {"size": size, "params": params, "setting": setting}
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    learner = None
    try:
        config = TrainConfig(
            model=str(model_dir), device=args.device, precision=precision, steps=args.steps + 1,
            gradient_checkpointing=checkpointing, logprob_chunk_tokens=args.logprob_chunk_tokens,
            cuda_graphs=graphs,
        )  # fmt: skip
        learner = Learner(config)
        batch, pairs = synthetic_batch(
            args.pairs, args.prompt_tokens, args.completion_tokens, SIZES[size].vocab_size, args.seed
        )
        times = []
        for i in range(args.steps + 1):
            sync()
            t0 = time.perf_counter()
            learner.train_step(batch, pairs)
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        if args.loop:
            row.update(loop_phases(learner, batch, pairs, args.steps, sync))
        if args.profile:
            row.update(profile(learner, batch, pairs, args, f"{size}-{setting}", sync))
        tokens = 2 * args.pairs * (args.prompt_tokens + args.completion_tokens)
        flop = (6 + 2 + (2 if checkpointing else 0)) * params * tokens
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        row.update(seconds=median(times), peak_gib=peak, fits=True, tflops=flop / median(times) / 1e12)
    except torch.OutOfMemoryError as e:
        row.update(
            fits=False, error=str(e).splitlines()[0][:200], peak_gib=torch.cuda.max_memory_allocated() / 2**30
        )
    finally:
        del learner
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def loop_work(learner, batch, pairs, dtypes, reference=None) -> None:
    """What the loop does per step on one GPU with ``push: ipc``: the DPO step, the finite-weights check, the
    snapshot into CUDA IPC buckets (no sync between them)."""
    from trainer_client.transports.ipc import pack_buckets

    learner.train_step(batch, pairs, reference)
    learner.check_finite("")
    pack_buckets(learner.full_weights(dtypes), dtypes, 1 << 30)


def loop_step(learner, batch, pairs, sync, dtypes):
    """One step of the training loop on one GPU with ``push: ipc``, each phase's seconds (sync between)."""
    from trainer_client.transports.ipc import pack_buckets

    seconds = {}
    t0 = time.perf_counter()
    learner.train_step(batch, pairs)
    sync()
    seconds["step"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    learner.check_finite("")
    sync()
    seconds["finite"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pack_buckets(learner.full_weights(dtypes), dtypes, 1 << 30)
    sync()
    seconds["snapshot"] = time.perf_counter() - t0
    return seconds


def loop_phases(learner, batch, pairs, steps: int, sync) -> dict:
    """Median seconds of each phase of the loop's step, and of the three without syncs between them."""
    dtypes = {name: "bfloat16" for name in learner.state_dict()}
    phases = [loop_step(learner, batch, pairs, sync, dtypes) for _ in range(steps)]
    together = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        loop_work(learner, batch, pairs, dtypes)
        sync()
        together.append(time.perf_counter() - t0)
    out = {f"loop_{k}_seconds": median([p[k] for p in phases]) for k in phases[0]}
    out["loop_seconds"] = median(together)
    out["loop_reference_ahead_seconds"] = loop_reference_ahead(learner, batch, pairs, steps, sync, dtypes)
    return out


def loop_reference_ahead(learner, batch, pairs, steps: int, sync, dtypes) -> float:
    """Median seconds of the loop's step with ``reference_ahead``: the DPO step on log-probabilities of the
    reference taken before it, the check and the snapshot, while another thread takes the next step's (as
    the producer thread does); each step's time runs until both threads are done."""
    reference, times = learner.reference_pair_logps(batch, pairs), []
    for _ in range(steps):
        ahead: list = []
        producer = threading.Thread(
            target=lambda out=ahead: out.append(learner.reference_pair_logps(batch, pairs))
        )
        sync()
        t0 = time.perf_counter()
        producer.start()
        loop_work(learner, batch, pairs, dtypes, reference)
        sync()
        producer.join()
        times.append(time.perf_counter() - t0)
        reference = ahead[0]
    return median(times)


def profile(learner, batch, pairs, args, name: str, sync) -> dict:
    """CPU time by operator over ``args.steps`` loop steps (train_step, check_finite, IPC snapshot), written
    to ``args.profile / profile-NAME.txt``; returns the kernels launched per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dtypes = {n: "bfloat16" for n in learner.state_dict()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.steps):
            loop_step(learner, batch, pairs, sync, dtypes)
    events = prof.key_averages()
    launch_calls = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    launches = sum(e.count for e in events if e.key in launch_calls)
    args.profile.mkdir(parents=True, exist_ok=True)
    table = events.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=70)
    (args.profile / f"profile-{name}.txt").write_text(table)
    print(table, flush=True)
    return {"kernel_launches_per_step": launches / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1b"], choices=list(SIZES))
    parser.add_argument("--settings", nargs="+", default=["bf16", "bf16+gc", "fp32"], choices=list(SETTINGS))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--logprob-chunk-tokens", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop", action="store_true", help="time the loop's phases too")
    parser.add_argument("--profile", type=Path, default=None, help="folder for a torch.profiler table")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a quick check of the script")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    machine = describe_machine()
    rows = [measure(size, setting, args) for size in args.sizes for setting in args.settings]
    print(f"\n## DPO step: {args.pairs} pairs x (prompt {args.prompt_tokens} + completion "
          f"{args.completion_tokens} tokens); {machine_line(machine)}\n")  # fmt: skip
    table = [
        [f"{r['size']} ({human_params(r['params'])})", r["setting"],
         r["seconds"] if r["fits"] else "out of memory", r["peak_gib"], r.get("tflops", "")]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(["model", "setting", "s/step", "peak GiB", "TFLOP/s"], table))
    write_results(
        args.out or args.work_dir / "learner_step.json", "learner_step", machine, vars(args), {"rows": rows}
    )


if __name__ == "__main__":
    main()
