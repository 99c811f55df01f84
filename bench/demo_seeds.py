"""The demo on several seeds, synchronous (max_staleness 0) and asynchronous (max_staleness 1).

    python bench/demo_seeds.py                      # seeds 0 1 2, 300 steps: about 40 min on 2 cores
    python bench/demo_seeds.py --seeds 0 --steps 50 --results /tmp/results.md

For each seed: the starter of that seed (cached, see trainer_client/starter.py) is served by one
generation server; each mode starts from the starter (its weights are pushed back first), is evaluated
greedily on the held-out prompts before and after training, and trains with the demo's settings. The
order of the two modes alternates between seeds so a slow patch of a shared machine does not always hit
the same mode. Writes a markdown table (``docs/RESULTS.md`` by default) with the command that made it,
a JSON file of every number, and ``curves.png`` of each seed's two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_and_command_lines, write_between_markers  # noqa: E402

MODES = {0: "sync", 1: "async"}


def run_seed(seed: int, steps: int, out: Path, overrides: list[str], cache_dir: str | None) -> list[dict]:
    from safetensors.torch import load_file

    from trainer_client.client import GeneratorClient
    from trainer_client.demo import demo_config, summarize
    from trainer_client.evaluate import evaluate
    from trainer_client.local_server import local_server, pinned_to_spare_core
    from trainer_client.plots import plot_runs, read_metrics
    from trainer_client.starter import StarterConfig, ensure_starter
    from trainer_client.tasks import load_task
    from trainer_client.train import run_training

    starter = ensure_starter(StarterConfig(seed=seed), cache_dir)
    task = load_task("arithmetic")
    order = [0, 1] if seed % 2 == 0 else [1, 0]
    rows, curves, heldout = [], {}, {}
    with (
        local_server(starter, log_path=out / f"seed{seed}-server.log") as url,
        GeneratorClient(url) as client,
        pinned_to_spare_core(client.health().device == "cpu"),
    ):
        for staleness in order:
            version = client.health().weights_version
            if version > 0:  # back to the starter's weights
                client.push_weights(load_file(str(starter / "model.safetensors")), version + 1)
            before = evaluate(client, task)
            run_dir = out / f"seed{seed}-{MODES[staleness]}"
            config = demo_config(
                str(starter),
                url,
                seed,
                [*overrides, f"steps={steps}", f"max_staleness={staleness}", f"output_dir={run_dir}"],
            )
            load = os.getloadavg()[0]
            summary = run_training(config)
            after = evaluate(client, task)
            stats = summarize(run_dir / "metrics.jsonl")
            row = {
                "seed": seed,
                "max_staleness": staleness,
                "before": before.mean_reward,
                "after": after.mean_reward,
                "gain": after.mean_reward - before.mean_reward,
                "train_wall_seconds": summary["wall_seconds"],
                "seconds_per_step": summary["wall_seconds"] / steps,
                "mean_staleness": stats["mean_staleness"],
                "load_average_at_start": round(load, 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            label = f"max_staleness {staleness} ({MODES[staleness]})"
            curves[label] = read_metrics(run_dir / "metrics.jsonl")
            heldout[label] = [(0, before.mean_reward), (stats["steps"], after.mean_reward)]
    plot_runs(curves, out / f"seed{seed}-curves.png", title=f"seed {seed}: sync vs async", heldout=heldout)
    return rows


def results_markdown(rows: list[dict], command: str, steps: int, overrides: list[str]) -> str:
    from trainer_client.demo import DEMO_DEFAULTS

    by_mode = {m: [r for r in rows if r["max_staleness"] == m] for m in MODES}
    d = DEMO_DEFAULTS
    settings = f"batch_size {d['batch_size']}, samples_per_prompt {d['samples_per_prompt']}, "
    settings += f"learning_rate {d['learning_rate']}, beta {d['beta']}, loss {d['loss']}"
    settings += "".join(f", {o}" for o in overrides)
    lines = [
        "## The demo on three seeds, synchronous vs asynchronous",
        "",
        "Online DPO of the demo's starter policies (two-digit addition, exact-match reward, greedy",
        f"accuracy on 500 held-out prompts) for {steps} steps with the demo's settings ({settings}),",
        "through the generation server on the CPU. `sync` is `max_staleness: 0` (generate, then train);",
        "`async` is `max_staleness: 1` (the next batch is generated while the trainer trains on this one).",
        "Wall time is the training loop only (no starter, no server start, no evaluation).",
        "",
        *machine_and_command_lines(command),
        "| seed | mode | before | after | gain | training wall time (s) | s / step | mean staleness |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], r["max_staleness"])):
        lines.append(
            f"| {r['seed']} | {MODES[r['max_staleness']]} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{r['gain']:+.3f} | {r['train_wall_seconds']:.1f} | {r['seconds_per_step']:.2f} | "
            f"{r['mean_staleness']:.2f} |"
        )
    lines += ["", "| mode | mean before | mean after | mean gain (sd) | mean training wall time (s) |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for m, rs in by_mode.items():
        if not rs:
            continue
        gains = [r["gain"] for r in rs]
        sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines.append(
            f"| {MODES[m]} | {statistics.mean(r['before'] for r in rs):.3f} | "
            f"{statistics.mean(r['after'] for r in rs):.3f} | {statistics.mean(gains):+.3f} ({sd:.3f}) | "
            f"{statistics.mean(r['train_wall_seconds'] for r in rs):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/demo_seeds", help="folder for runs, logs and curves")
    parser.add_argument("--results", default="docs/RESULTS.md", help="markdown table to write")
    parser.add_argument("--cache-dir", help="starter cache (default: $ONLINE_DPO_CACHE, ~/.cache/online-dpo)")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows = []
    for seed in args.seeds:
        rows += run_seed(seed, args.steps, out, args.overrides, args.cache_dir)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    command = "python bench/demo_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = results_markdown(rows, command.strip(), args.steps, args.overrides)
    write_between_markers(Path(args.results), text, "demo_seeds.py")
    print(f"wrote {args.results} and {out}/ in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
