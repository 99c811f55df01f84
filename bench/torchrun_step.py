"""The same online DPO run launched as one process and under ``torchrun`` (FSDP2), against one server.

Starts one generation server, then runs ``trainer-client train`` as a child process twice with one config:
plainly (``python -m trainer_client train``) and with ``torchrun --nproc-per-node N -m trainer_client
train`` (each rank takes its share of a step's pairs, FSDP2 per decoder layer; NCCL on a GPU, gloo on the
CPU). From each run's ``metrics.jsonl``, after the first ``--skip`` steps: wall, generation g, trainer t and
push seconds per step, as in ``bench/async_vs_sync.py``; plus the final held-out-free loss and each run's
peak GPU memory (rank 0) as the trainer logs it.

    PYTHONPATH=$PWD python bench/torchrun_step.py --size 1b --nproc 1 --set precision=bf16
    PYTHONPATH=$PWD python bench/torchrun_step.py --quick          # CPU check: tiny model, 2 ranks, gloo
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.async_vs_sync import read_run, run_config, summarise, write_prompts  # noqa: E402
from bench.common import (  # noqa: E402
    ServerOptions,
    add_common_args,
    add_training_args,
    build_model,
    describe_machine,
    machine_line,
    markdown_table,
    parse_args,
    resolve_dtype,
    running_server,
    write_results,
)

QUICK = dict(size="tiny", steps=4, skip=1, nproc=2, batch_size=8, max_new_tokens=32, enforce_eager=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_args(parser, size="1b", steps=12)
    parser.add_argument("--nproc", type=int, default=1, help="ranks of the torchrun run")
    parser.add_argument("--staleness", type=int, default=1, help="max_staleness of both runs")
    add_common_args(parser)
    args = parse_args(parser, QUICK, argv)

    work = args.work_dir / "torchrun_step"
    model_dir = build_model(args.size, "float32", args.work_dir / "models")
    task = write_prompts(work / "prompts.jsonl")
    options = ServerOptions.from_args(args, resolve_dtype(args.dtype))
    launchers = {
        "1 process": [sys.executable, "-m", "trainer_client"],
        f"torchrun x{args.nproc}": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", "trainer_client",
        ],
    }  # fmt: skip
    runs = {}
    root = str(Path(__file__).resolve().parents[1])  # the children import trainer_client from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with running_server(model_dir, options, work / "server.log") as server:
        for name, launcher in launchers.items():
            out_dir = work / name.replace(" ", "-")
            config = run_config(args, model_dir, server.url, task, out_dir, args.overrides)
            config["max_staleness"] = args.staleness
            config_path = work / f"{out_dir.name}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            print(f"{name}: {args.steps} steps ...", flush=True)
            started = time.perf_counter()
            with open(work / f"{out_dir.name}.log", "w") as log:
                rc = subprocess.run(
                    [*launcher, "train", "--config", str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                    env=env, timeout=3600,
                ).returncode  # fmt: skip
            seconds = time.perf_counter() - started
            if rc != 0:
                print(f"  exit {rc}; last lines of {log.name}:", flush=True)
                print("".join(Path(log.name).read_text().splitlines(keepends=True)[-30:]))
                runs[name] = {"exit_code": rc, "total_seconds": seconds}
                continue
            records = read_run(out_dir)
            runs[name] = {
                **summarise(records, args.skip, args.batch_size * args.samples_per_prompt),
                "final_loss": records[-1].get("loss"),
                "peak_gpu_gib": max((r.get("gpu_peak_gib") or 0.0) for r in records) or None,
                "exit_code": 0,
                "total_seconds": seconds,
            }

    headers = ["launcher", "wall s/step", "gen g s/step", "train t s/step", "push s/step", "final loss"]
    headers += ["run s (with start-up)"]
    rows = [
        [name, r.get("wall_per_step"), r.get("gen_per_step"), r.get("train_per_step"), r.get("push_per_step"),
         r.get("final_loss"), r["total_seconds"]] if r["exit_code"] == 0 else [name, f"exit {r['exit_code']}",
         "", "", "", "", r["total_seconds"]]
        for name, r in runs.items()
    ]  # fmt: skip
    machine = describe_machine()
    print()
    print(f"Online DPO, {args.size} model, {args.steps} steps (first {args.skip} not averaged), batch "
          f"{args.batch_size} x K={args.samples_per_prompt}, max_staleness {args.staleness}; "
          f"{machine_line(machine)}")  # fmt: skip
    print()
    print(markdown_table(headers, rows))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results(args.out or args.work_dir / "torchrun_step.json", "torchrun_step", machine, settings, runs)
    sys.exit(0 if all(r["exit_code"] == 0 for r in runs.values()) else 1)


if __name__ == "__main__":
    main()
