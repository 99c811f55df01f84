"""Benchmark 4: asynchronous vs synchronous online DPO, the same run on the same machine.

Starts one generation server, then runs the trainer (in this process) twice with identical settings except
``max_staleness``: 0 (synchronous: generate, then train, then push, then generate ...) and 1 (the next
batch is generated while the current one trains). From each run's ``metrics.jsonl``, after the first
``--skip`` steps:

- wall seconds per step;
- g = the producer thread's seconds per step (the server's ``POST /generate`` of one batch, then scoring
  and, with ``reference_ahead``, the reference's forward over the pairs), t = trainer busy seconds per
  step (DPO forward/backward/step + weight snapshot), and the push seconds;
- trainer idle = seconds per step the trainer waited for a batch; generator idle = wall - g, the seconds
  per step the server was not generating (waiting for weights, reloading, or for the trainer);
- speedup = sync wall / async wall, against the ideal ``(g + t) / max(g, t)`` for the g and t measured
  in the synchronous run (perfect overlap, free pushes); and ``max(g, t) / wall`` of the asynchronous run
  itself (how close it came to its own bound: sharing a machine, its g and t grow).

On a CPU the two sides share the machine: vLLM's CPU worker binds its OpenMP threads to core 0 and leaves
the last core free, so by default (``--quick``) the trainer is pinned to the last core with one torch
thread, as if generator and trainer had a device each. Prints a markdown table and writes JSON
(``--out``, default ``runs/bench/async_vs_sync.json``).

    PYTHONPATH=$PWD python bench/async_vs_sync.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ServerOptions,
    add_common_args,
    add_training_args,
    build_model,
    describe_machine,
    has_cuda,
    machine_line,
    markdown_table,
    parse_args,
    resolve_dtype,
    running_server,
    write_results,
)

QUICK = dict(size="tiny", steps=20, batch_size=8, samples_per_prompt=4, max_new_tokens=48, enforce_eager=True)


def summarise(records: list[dict], skip: int, completions_per_step: int) -> dict:
    rs = records[skip:]
    wall = mean(r["wall_seconds"] for r in rs)
    g = mean(r["gen_seconds"] for r in rs)
    # (scoring and the reference taken ahead run in the producer thread, after generation: its side)
    prepare = mean(r.get("score_seconds", 0) + r.get("reference_seconds", 0) for r in rs)
    t = mean(r["train_seconds"] for r in rs)
    return {
        "steps_measured": len(rs),
        "wall_per_step": wall,
        "gen_per_step": g,
        "prepare_per_step": prepare,
        "producer_per_step": g + prepare,  # g of the bound max(g, t): what the producer thread does per step
        "train_per_step": t,
        "push_per_step": mean(r["push_seconds"] for r in rs),
        "gen_tokens_per_second": mean(r["completion_tokens"] * completions_per_step for r in rs) / g,
        "trainer_idle_per_step": mean(r["wait_seconds"] for r in rs),
        "generator_idle_per_step": max(0.0, wall - g),
        "overlap_per_step": mean(r["overlap_seconds"] for r in rs),
        "max_staleness_seen": max(r["staleness"] for r in rs),
        "reward_mean": mean(r["reward_mean"] for r in rs),
    }


def write_prompts(path: Path) -> Path:
    """The runs' task: 512 counting prompts as JSONL (scored by completion length)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"Count to {i}:"}) + "\n" for i in range(512)))
    return path


def run_config(args, model_dir: Path, server_url, task: Path, out_dir: Path, overrides: list[str]) -> dict:
    """The trainer config of one benchmark run (TrainConfig's keys), from the shared flags and ``--set``s."""
    from trainer_client.config import parse_override

    return dict(
        model=str(model_dir), server_url=server_url, task=str(task), reward="length", steps=args.steps,
        batch_size=args.batch_size, samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens, learning_rate=args.learning_rate,
        device="cuda" if has_cuda() else "cpu", output_dir=str(out_dir), seed=args.seed, progress_bar=False,
        **dict(parse_override(item) for item in overrides),
    )  # fmt: skip


def read_run(out_dir: Path) -> list[dict]:
    """A finished run's metrics lines; its checkpoints are deleted (13 GB for a 1.1B policy with AdamW)."""
    for folder in out_dir.glob("checkpoint-*"):
        shutil.rmtree(folder)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_args(parser, size="0.1b", steps=20)
    parser.add_argument("--staleness", default="0,1", help="max_staleness values, run in this order")
    parser.add_argument("--trainer-threads", type=int, default=None, help="torch threads of the trainer")
    parser.add_argument(
        "--trainer-cpus", default=None, help="comma-separated CPU ids to pin the trainer to (CPU runs)"
    )
    parser.add_argument(
        "--push", default="auto", help="weight transport(s), comma-separated: auto, http, shared, ipc"
    )
    parser.add_argument(
        "--sweep", default=None, metavar="KEY=V1,V2",
        help="one more trainer config key to vary, e.g. --sweep precision=bf16,fp32 (runs multiply)",
    )  # fmt: skip
    parser.add_argument("--replicas", type=int, default=1, help="generation servers, all on this machine")
    parser.add_argument(
        "--server-arg", dest="server_args", action="append", default=[], metavar="FLAG",
        help="one more server flag, e.g. --server-arg=--ipc-load=direct (repeatable)",
    )  # fmt: skip
    add_common_args(parser)
    quick = dict(QUICK)
    if not has_cuda() and (os.cpu_count() or 1) >= 2:
        quick.update(trainer_threads=1, trainer_cpus=str(os.cpu_count() - 1))
    args = parse_args(parser, quick, argv)

    import torch  # after argument parsing: --help stays fast

    from trainer_client.config import TrainConfig
    from trainer_client.train import run_training

    dtype = resolve_dtype(args.dtype)
    device = "cuda" if has_cuda() else "cpu"
    work = args.work_dir
    model_dir = build_model(args.size, "float32", work / "models")  # the trainer's policy is fp32
    task = write_prompts(work / "async_vs_sync" / "prompts.jsonl")
    options = ServerOptions.from_args(
        args, dtype, checkpoint_root=work / "async_vs_sync" / "shared", extra=tuple(args.server_args)
    )
    staleness_values = [int(s) for s in args.staleness.split(",")]
    transports = args.push.split(",")
    if args.sweep:  # each (push, sweep value) pair is one row group, labelled "push key=value"
        key, values = args.sweep.split("=", 1)
        variants = [(f"{p} {key}={v}", p, [f"{key}={v}"]) for p in transports for v in values.split(",")]
    else:
        variants = [(p, p, []) for p in transports]
    by_transport: dict[str, dict[int, dict]] = {}
    with contextlib.ExitStack() as servers:
        urls = [
            servers.enter_context(
                running_server(model_dir, options, work / "async_vs_sync" / f"server-{i}.log")
            ).url
            for i in range(args.replicas)
        ]
        if args.trainer_cpus:  # after the server started: its processes keep the default affinity
            os.sched_setaffinity(0, {int(c) for c in args.trainer_cpus.split(",")})
        if args.trainer_threads:
            torch.set_num_threads(args.trainer_threads)
        for (label, push, extra), staleness in [(v, st) for v in variants for st in staleness_values]:
            out_dir = work / "async_vs_sync" / f"{label.replace(' ', '-')}-staleness-{staleness}"
            url = urls if len(urls) > 1 else urls[0]
            config = TrainConfig(
                **run_config(args, model_dir, url, task, out_dir, args.overrides + extra),
                max_staleness=staleness,
                push=push,
                shared_dir=str(work / "async_vs_sync" / "shared") if push == "shared" else None,
            )
            print(f"push={label} max_staleness={staleness}: {args.steps} steps ...", flush=True)
            started = time.perf_counter()
            summary = run_training(config)
            records = read_run(out_dir)
            by_transport.setdefault(label, {})[staleness] = {
                **summarise(records, args.skip, args.batch_size * args.samples_per_prompt),
                "total_seconds": time.perf_counter() - started,
                "metrics_path": summary["metrics_path"],
            }

    rows = []
    headers = ["push", "max_staleness", "wall s/step", "gen s/step", "score+ref s/step", "train t s/step"]
    headers += ["push s/step"]
    headers += ["trainer idle s/step", "generator idle s/step", "gen hidden s/step", "wall / max(g, t)"]
    headers += ["gen tokens/s"]
    results: dict = {"runs": {}}
    for push, runs in by_transport.items():
        for staleness, r in runs.items():
            bound = max(r["producer_per_step"], r["train_per_step"])
            rows.append(
                [push, staleness, r["wall_per_step"], r["gen_per_step"], r["prepare_per_step"]]
                + [r["train_per_step"]]
                + [r["push_per_step"], r["trainer_idle_per_step"], r["generator_idle_per_step"]]
                + [r["overlap_per_step"], r["wall_per_step"] / bound, r["gen_tokens_per_second"]]
            )
        summary: dict = {"runs": {str(k): v for k, v in runs.items()}}
        if 0 in runs and 1 in runs:
            g, t = runs[0]["producer_per_step"], runs[0]["train_per_step"]
            ideal = (g + t) / max(g, t)
            speedup = runs[0]["wall_per_step"] / runs[1]["wall_per_step"]
            summary.update(
                speedup=speedup, ideal_speedup=ideal, fraction_of_ideal=(speedup - 1) / (ideal - 1)
            )
            # how close the asynchronous run came to its bound max(g, t) (its g and t grow under contention)
            a = runs[1]
            bound = max(a["producer_per_step"], a["train_per_step"])
            summary["async_bound_fraction"] = bound / a["wall_per_step"]
        results["runs"][push] = summary
    machine = describe_machine()
    machine["load_average_1m"] = os.getloadavg()[0]
    print()
    print(f"Online DPO, {args.size} model, {args.replicas} server(s), {args.steps} steps (first {args.skip} "
          f"not averaged), batch "
          f"{args.batch_size} x K={args.samples_per_prompt}, {args.max_new_tokens} new tokens; "
          f"{machine_line(machine)}; load average {machine['load_average_1m']:.1f}")  # fmt: skip
    print()
    print(markdown_table(headers, rows))
    for push, summary in results["runs"].items():
        if "speedup" in summary:
            print(
                f"\npush={push}: speedup (sync wall / async wall) {summary['speedup']:.2f}x; ideal "
                f"(g+t)/max(g,t) for the synchronous g and t: {summary['ideal_speedup']:.2f}x; share of the "
                f"ideal gain achieved: {summary['fraction_of_ideal']:.0%}; the asynchronous run's "
                f"max(g, t) / wall: {summary['async_bound_fraction']:.0%}"
            )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(device=device, server_dtype=dtype)
    write_results(args.out or work / "async_vs_sync.json", "async_vs_sync", machine, settings, results)


if __name__ == "__main__":
    main()
