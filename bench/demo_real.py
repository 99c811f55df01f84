"""``./demo.sh --model smollm2`` on several seeds: does the real model learn within the demo's time?

Each seed runs the whole demo as a user's command does (``trainer_client.demo.run_demo``): the model
(SmolLM2-135M-Instruct from its PyPI package, converted once and cached), a fresh generation server,
greedy held-out accuracy before, online DPO with the demo's settings, held-out accuracy after. The seeds
run one after another on the same machine; the load average at each start is recorded, since a shared
machine's load changes the wall times (never the accuracies' meaning). Writes a markdown table into
``docs/RESULTS.md`` (between its markers), a JSON file of every number, and each run's folder.

    python bench/demo_real.py                                   # seeds 0 1 2: about 25 min on 2 cores
    python bench/demo_real.py --seeds 0 --set steps=10 --results /tmp/results.md
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


def results_markdown(rows: list[dict], command: str, overrides: list[str] = ()) -> str:
    from trainer_client.config import parse_override
    from trainer_client.demo import SMOLLM2_DEFAULTS

    d = {**SMOLLM2_DEFAULTS, **dict(parse_override(item) for item in overrides)}  # what the runs used
    settings = ", ".join(
        f"{k} {d[k]}"
        for k in (
            "steps",
            "batch_size",
            "samples_per_prompt",
            "max_new_tokens",
            "temperature",
            "learning_rate",
        )
    )
    settings += (
        f", LoRA rank {d.get('lora_rank', 0)} ({d.get('lora_sync', 'adapter')} sync)"
        if d.get("lora_rank")
        else ", full fine-tuning"
    )
    options = ", ".join(f"{k} {v}" for k, v in d["task_options"].items())
    lines = [
        f"## `./demo.sh` on {len(rows)} seeds",
        "",
        f"SmolLM2-135M-Instruct on reasoning-gym's `{d['task'].split(':', 1)[1]}` ({options}), greedy",
        f"accuracy by the dataset's own verifier on {rows[0]['heldout_prompts']} held-out questions, before",
        f"and after online DPO with the demo's settings ({settings}), asynchronous (`max_staleness: 1`),",
        "through the generation server on the CPU. The demo's wall time counts everything after",
        "installation: the model (cached after the first run), the server's start, both evaluations and",
        "training.",
        "",
        *machine_and_command_lines(command),
        "| seed | before | after | after / before | training (s) | demo (s) | load average at start |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["after"] / r["before"] if r["before"] else float("inf")
        lines.append(
            f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {ratio:.2f}x | "
            f"{r['train_wall_seconds']:.0f} | {r['demo_wall_seconds']:.0f} | "
            f"{r['load_average_at_start']:.1f} |"
        )
    if len(rows) > 1:
        walls = [r["demo_wall_seconds"] for r in rows]
        lines += [
            "",
            f"Mean gain {statistics.mean(r['after'] - r['before'] for r in rows):+.3f}; the smallest ratio "
            f"{min(r['after'] / r['before'] for r in rows if r['before']):.2f}x; demo wall time "
            f"{min(walls):.0f}-{max(walls):.0f} s.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/demo_real", help="folder for the runs")
    parser.add_argument("--results", default="docs/RESULTS.md", help="markdown file to write the table into")
    args = parser.parse_args(argv)

    from trainer_client.demo import run_demo

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # (as demo.sh)
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        load = os.getloadavg()[0]
        started = time.monotonic()
        summary = run_demo(seed, [*args.overrides, f"output_dir={out / f'seed{seed}'}"], policy="smollm2")
        row = {
            "seed": seed,
            "before": summary["heldout_reward_before"],
            "after": summary["heldout_reward_after"],
            "heldout_prompts": summary["heldout_prompts"],
            "train_wall_seconds": summary["train_wall_seconds"],
            "demo_wall_seconds": time.monotonic() - started,
            "load_average_at_start": load,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    command = "python bench/demo_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_between_markers(
        Path(args.results), results_markdown(rows, command.strip(), args.overrides), "demo_real.py"
    )
    print(f"wrote {args.results} and {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
