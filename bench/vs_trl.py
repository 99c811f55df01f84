"""The same online DPO run in this project and in TRL's ``OnlineDPOTrainer``, side by side.

    PYTHONPATH=$PWD python bench/vs_trl.py --quick                    # seed 0, 20 steps: a few minutes
    PYTHONPATH=$PWD python bench/vs_trl.py --seeds 0 1 2 --results docs/RESULTS.md
    PYTHONPATH=$PWD python bench/vs_trl.py --size 300m --device cuda --trl-generation vllm

Per seed, from the demo's starter policy of that seed (``trainer_client/starter.py``, cached), with the
demo's settings (``trainer_client/demo.py``) except two samples per prompt, each configuration trains once:

- ``server-async``: this project, a generation server (``python -m generator_server``), ``max_staleness: 1``;
- ``server-async-ref-inside``: the same with ``reference_ahead: false`` (the reference's forward inside the
  step, not in the producer thread; not run unless named in ``--configs``);
- ``server-async-graphs``: ``server-async`` with ``cuda_graphs: true`` (a GPU; run when named);
- ``server-sync``: the same with ``max_staleness: 0``;
- ``colocate``: this project, vLLM inside the trainer process (``mode: colocate``);
- ``trl``: TRL's ``OnlineDPOTrainer`` (``bench/trl_run.py``, in its own process, optionally with another
  interpreter: ``--trl-python``), generating with transformers or with vLLM colocated (``--trl-generation``).

Same starter policy and reference, prompts (step s gets the same batch everywhere), exact-match reward,
samples per prompt (2: TRL's fixed number), batch size, learning rate and schedule, AdamW, gradient
clipping, beta, sigmoid loss, max new tokens, temperature and steps. Differences that cannot be removed
are in ``bench/trl_run.py``'s docstring (TRL trains on pairs whose two rewards tie; ours skips them).

Every final policy, and the starter, is scored by the same evaluator: ``trainer-client eval --colocate
--json`` (greedy, the 500 held-out prompts), in a process of its own. Wall time is the training loop only
(no model build, engine or server start, no evaluation): the sum of the step times in ``metrics.jsonl``
for this project, ``on_train_begin`` to ``on_train_end`` for TRL. Peak memory is the peak of the summed RSS
of every process of the run (server and trainer in server mode), sampled every ``--interval`` seconds from
start to exit; on a GPU also the device's used memory above what was in use before.

The configurations of a seed run one after the other, in an order rotated per seed so a slow patch of a
shared machine does not always hit the same one; ``--repeats N`` runs that sequence N times (the summary
averages over seeds and repeats). A configuration that fails (TRL not installed, TRL's
vLLM path not running here) gets its error in the table; the others still run.

This script does not import TRL: only ``bench/trl_run.py`` does, in its child process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.colocate_vs_server import MemorySampler  # noqa: E402
from bench.common import (  # noqa: E402
    DEFAULT_WORK_DIR,
    REPO_ROOT,
    ServerOptions,
    child_env,
    describe_machine,
    machine_line,
    running_server,
    write_between_markers,
    write_results,
)

CONFIGS = ("server-async", "server-async-ref-inside", "server-async-graphs", "server-sync", "colocate", "trl")
DEFAULT_CONFIGS = ("server-async", "server-sync", "colocate", "trl")
SAMPLES_PER_PROMPT = 2  # TRL's OnlineDPOTrainer always draws two completions per prompt
QUICK = dict(seeds=[0], steps=20)


# ---------------------------------------------------------------------------------------------------------
# Evaluation: the same command for every model
# ---------------------------------------------------------------------------------------------------------
def heldout_accuracy(model: Path | str, device: str, log: Path) -> float:
    """Greedy held-out accuracy of a model folder by ``trainer-client eval --colocate --json``."""
    cmd = [sys.executable, "-m", "trainer_client", "eval", "--model", str(model), "--colocate", "--json"]
    cmd += ["--device", device]
    with open(log, "w") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env())
    if out.returncode != 0:
        raise RuntimeError(f"eval of {model} exited with {out.returncode}; see {log}")
    return json.loads(out.stdout.strip().splitlines()[-1])["mean_reward"]


# ---------------------------------------------------------------------------------------------------------
# The configurations
# ---------------------------------------------------------------------------------------------------------
def our_config(name: str, starter: Path, args, seed: int, out: Path) -> dict:
    from trainer_client.demo import demo_config

    overrides = [
        f"steps={args.steps}",
        f"samples_per_prompt={args.samples_per_prompt}",
        f"device={args.device}",
        f"output_dir={out}",
        "progress_bar=false",
        *args.overrides,
    ]
    if name == "colocate":
        overrides += ["mode=colocate", "max_staleness=1"]
    else:
        overrides.append(f"max_staleness={0 if name == 'server-sync' else 1}")
    if name == "server-async-ref-inside":
        overrides.append("reference_ahead=false")
    if name == "server-async-graphs":
        overrides.append("cuda_graphs=true")
    config = demo_config(str(starter), "http://127.0.0.1:0", seed, overrides, args.size)
    return config.model_dump(mode="json")


def _pin_to_spare_core() -> None:
    """The demo's placement of the trainer in server mode (``trainer_client/local_server.py``): the last
    allowed core, which vLLM's CPU worker leaves free."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) > 1:
        os.sched_setaffinity(0, {max(allowed)})


def run_ours(name: str, starter: Path, args, seed: int, out: Path) -> dict:
    """One run of ``python -m trainer_client train`` (with its own server in server mode)."""
    config = our_config(name, starter, args, seed, out)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = child_env()
    env["OMP_NUM_THREADS"] = str(args.torch_threads)
    on_cpu = args.device == "cpu"
    result: dict = {}
    with MemorySampler(args.interval, gpu=not on_cpu) as sampler, contextlib.ExitStack() as stack:
        if config["mode"] == "server":
            server_args = ["--log-level", "warning"]
            if not on_cpu:
                from trainer_client.demo import SERVER_GPU_MEMORY_UTILIZATION

                server_args += ["--gpu-memory-utilization", str(SERVER_GPU_MEMORY_UTILIZATION)]
            options = ServerOptions(dtype="float32" if on_cpu else "auto", enforce_eager=on_cpu, seed=seed)
            options.extra = tuple(server_args)
            server = stack.enter_context(running_server(starter, options, out / "server.log"))
            sampler.watch(server.proc.pid)
            config["server_url"] = server.url
            (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "trainer_client", "train", "--config", str(out / "config.yaml")]
        pin = _pin_to_spare_core if config["mode"] == "server" and on_cpu else None
        with open(out / "trainer.log", "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, preexec_fn=pin
            )
            sampler.watch(proc.pid)
            stdout, _ = proc.communicate()
        if proc.returncode != 0:
            tail = (out / "trainer.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"trainer exited with {proc.returncode}: " + " | ".join(tail))
    result.update(sampler.result())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result["steps"] = len(records)
    result["train_wall_seconds"] = sum(r["wall_seconds"] for r in records)
    result["mean_staleness"] = statistics.mean(r["staleness"] for r in records)
    result["mean_pairs"] = statistics.mean(r.get("pairs", 0) for r in records)
    # where a step's time goes (medians over the steps after the first, which includes the first batch's wait)
    keys = ("wall_seconds", "gen_seconds", "gen_server_seconds", "gen_weights_wait_seconds")
    keys += ("reference_seconds", "train_seconds", "train_cpu_seconds", "push_seconds", "wait_seconds")
    for key in keys:
        values = [r[key] for r in records[1:] if key in r]
        if values:
            result[f"median_{key}"] = statistics.median(values)
    done = [line for line in stdout.splitlines() if "final checkpoint" in line]
    result["final_model"] = done[-1].split("final checkpoint", 1)[1].strip()
    result["generation"] = "vLLM (server)" if config["mode"] == "server" else "vLLM (colocated)"
    return result


def run_trl(starter: Path, args, seed: int, out: Path, generation: str) -> dict:
    """One run of ``bench/trl_run.py`` with ``--trl-python``."""
    cfg = {k: v for k, v in our_config("server-sync", starter, args, seed, out).items()}
    cmd = [args.trl_python, str(REPO_ROOT / "bench" / "trl_run.py"), "--model", str(starter)]
    cmd += ["--out", str(out), "--steps", str(args.steps), "--batch-size", str(cfg["batch_size"])]
    cmd += ["--learning-rate", str(cfg["learning_rate"]), "--beta", str(cfg["beta"]), "--loss", cfg["loss"]]
    cmd += ["--max-new-tokens", str(args.max_new_tokens), "--temperature", str(cfg["temperature"])]
    cmd += ["--seed", str(seed), "--threads", str(args.trl_threads)]
    if generation == "vllm":
        cmd.append("--vllm")
    env = child_env()
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    with MemorySampler(args.interval, gpu=args.device != "cpu") as sampler:
        with open(out / "trl.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            sampler.watch(proc.pid)
            stdout, _ = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("TRL_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"TRL exited with {proc.returncode}: {_error_line(out / 'trl.log')}")
    result = json.loads(lines[-1].removeprefix("TRL_RESULT "))
    result.update(sampler.result())
    result["generation"] = "vLLM (colocated)" if generation == "vllm" else "transformers"
    return result


def _error_line(log: Path) -> str:
    """The last line of a log that looks like an error (or its last line)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["(empty log)"])[-1][:300]


# ---------------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------------
def run_seed(seed: int, args, work: Path) -> list[dict]:
    from trainer_client.starter import ensure_starter, starter_config

    starter = ensure_starter(starter_config(args.size, seed=seed), args.cache_dir, device=args.device)
    seed_dir = work / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    before = starter_accuracy(starter, args.device, seed_dir)
    print(f"[seed {seed}] starter {starter}: held-out accuracy {before:.3f}", flush=True)
    names = list(args.configs)
    shift = seed % len(names)  # rotated before TRL's rows are expanded: its fallback row stays after vLLM's
    names = names[shift:] + names[:shift]
    if "trl" in names:  # one row per TRL generation backend asked for, next to each other
        i = names.index("trl")
        generations = list(args.trl_generation)
        if args.trl_fallback and generations == ["vllm"]:
            generations.append("transformers")  # run only if the vLLM row fails
        names[i : i + 1] = [f"trl-{g}" for g in generations]
    rows = []
    runs = [(name, r) for r in range(1, args.repeats + 1) for name in names]
    for name, repeat in runs:  # (repeats interleaved: a slow patch of the machine hits every configuration)
        if name == "trl-transformers" and args.trl_fallback and "trl-vllm" in names:
            vllm_rows = [r for r in rows if r["config"] == "trl-vllm"]
            if vllm_rows and "error" not in vllm_rows[0]:
                continue  # the fallback is not needed: TRL's vLLM path ran
        out = seed_dir / (name if args.repeats == 1 else f"{name}-{repeat}")
        out.mkdir(parents=True, exist_ok=True)
        row = {"seed": seed, "config": name, "before": before, "load_average_at_start": os.getloadavg()[0]}
        if args.repeats > 1:
            row["repeat"] = repeat
        print(f"[seed {seed}] {name}: training {args.steps} steps", flush=True)
        t0 = time.monotonic()
        try:
            if name.startswith("trl-"):
                row.update(run_trl(starter, args, seed, out, name.removeprefix("trl-")))
            else:
                row.update(run_ours(name, starter, args, seed, out))
            row["after"] = heldout_accuracy(row["final_model"], args.device, out / "eval.log")
            row["gain"] = row["after"] - row["before"]
            row["seconds_per_step"] = row["train_wall_seconds"] / row["steps"]
        except Exception as e:  # noqa: BLE001 - reported in the table, the other configurations still run
            row["error"] = f"{type(e).__name__}: {e}"
        row["run_seconds"] = time.monotonic() - t0
        print(f"[seed {seed}] {name}: {summary_line(row)}", flush=True)
        rows.append(row)
    return rows


def starter_accuracy(starter: Path, device: str, seed_dir: Path) -> float:
    """The starter's held-out accuracy, evaluated once per starter and device (kept in ``seed_dir``, so a
    seed whose configurations are run by several invocations, e.g. on a device with a time limit per
    command, evaluates its starter once)."""
    cache = seed_dir / "eval-starter.json"
    key = {"starter": str(starter), "device": device}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if {k: saved.get(k) for k in key} == key:
            return saved["accuracy"]
    accuracy = heldout_accuracy(starter, device, seed_dir / "eval-starter.log")
    cache.write_text(json.dumps({**key, "accuracy": accuracy}))
    return accuracy


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error']})"
    return (
        f"{r['before']:.3f} -> {r['after']:.3f}, {r['train_wall_seconds']:.1f} s "
        f"({r['seconds_per_step']:.2f} s/step), peak RSS {r['peak_rss_mib']:.0f} MiB"
    )


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def per_run_table(rows: list[dict], gpu: bool) -> str:
    head = "| seed | configuration | generation | before | after | gain | training wall (s) | s / step "
    head += "| peak RSS (MiB) | peak PSS (MiB) |" + (" peak GPU (MiB) |" if gpu else "")
    lines = [head, "|" + "|".join(["---:", "---", "---"] + ["---:"] * (7 + gpu)) + "|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["config"], r.get("repeat", 1))):
        config = r["config"] + (f" #{r['repeat']}" if "repeat" in r else "")
        if "error" in r:
            lines.append(f"| {r['seed']} | {config} | failed: {r['error']} |" + " |" * (7 + gpu))
            continue
        cells = [
            str(r["seed"]), config, r["generation"], f"{r['before']:.3f}", f"{r['after']:.3f}",
            f"{r['gain']:+.3f}", f"{r['train_wall_seconds']:.1f}", f"{r['seconds_per_step']:.2f}",
            f"{r['peak_rss_mib']:.0f}", f"{r['peak_pss_mib']:.0f}",
        ]  # fmt: skip
        if gpu:
            cells.append(_fmt(r.get("peak_gpu_mib"), ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    trl_wall = [r["train_wall_seconds"] for r in ok if r["config"].startswith("trl-transformers")]
    trl_wall = trl_wall or [r["train_wall_seconds"] for r in ok if r["config"].startswith("trl-")]
    lines = [
        "| configuration | runs | mean gain (sd) | mean training wall (s) | wall / TRL's | mean s / step "
        "| mean peak RSS (MiB) | mean peak PSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted({r["config"] for r in rows}):
        rs = [r for r in ok if r["config"] == name]
        if not rs:
            lines.append(f"| {name} | 0 | - | - | - | - | - | - |")
            continue
        gains = [r["gain"] for r in rs]
        sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        wall = statistics.mean(r["train_wall_seconds"] for r in rs)
        ratio = f"{wall / statistics.mean(trl_wall):.2f}" if trl_wall else "-"
        lines.append(
            f"| {name} | {len(rs)} | {statistics.mean(gains):+.3f} ({sd:.3f}) | {wall:.1f} | {ratio} | "
            f"{statistics.mean(r['seconds_per_step'] for r in rs):.2f} | "
            f"{statistics.mean(r['peak_rss_mib'] for r in rs):.0f} | "
            f"{statistics.mean(r['peak_pss_mib'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def results_markdown(rows: list[dict], args, machine: dict, command: str) -> str:
    from trainer_client.demo import DEMO_DEFAULTS, SIZE_DEFAULTS

    d = {**DEMO_DEFAULTS, **SIZE_DEFAULTS[args.size]}
    versions = sorted({f"TRL {r['trl']}" for r in rows if "trl" in r}) or ["TRL: no run succeeded"]
    gpu = any("peak_gpu_mib" in r for r in rows)
    return "\n".join(
        [
            "## Against TRL's OnlineDPOTrainer",
            "",
            f"`bench/vs_trl.py`: the demo's starter ({args.size}) trained {args.steps} steps by online DPO, "
            f"{d['batch_size']} prompts x {args.samples_per_prompt} samples per step, learning rate "
            f"{d['learning_rate']} (constant), beta {d['beta']}, {d['loss']} loss, temperature "
            f"{d['temperature']}, {args.max_new_tokens} new tokens at most; the same prompts at every step "
            "everywhere. Before/after: greedy accuracy on the 500 held-out prompts by `trainer-client eval "
            "--colocate` for every model. Wall time: the training loop only.",
            "",
            f"Machine: {machine_line(machine)}; {', '.join(versions)}.",
            "",
            "```bash",
            command,
            "```",
            "",
            per_run_table(rows, gpu),
            "",
            summary_table(rows),
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's for --size (300 tiny)")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="runs of each configuration per seed, interleaved (wall times vary from run to run)",
    )  # fmt: skip
    parser.add_argument("--size", default="tiny", choices=["tiny", "300m"], help="the demo's starter size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--samples-per-prompt", type=int, default=SAMPLES_PER_PROMPT,
        help="K of this project's runs (TRL's is always 2)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=4, help="the task's hint")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="another TrainConfig key for this project's runs (TRL's side is not changed by it)",
    )  # fmt: skip
    parser.add_argument(
        "--trl-python", default=sys.executable,
        help="interpreter with TRL installed, for bench/trl_run.py (default: this one)",
    )  # fmt: skip
    parser.add_argument(
        "--trl-generation", nargs="+", default=None, choices=["transformers", "vllm"],
        help="TRL's generation backends, a row each (default: vllm on a GPU, transformers on a CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--trl-fallback", action=argparse.BooleanOptionalAction, default=None,
        help="if TRL's vLLM row fails, run TRL with transformers too (default: on a GPU)",
    )  # fmt: skip
    parser.add_argument("--trl-threads", type=int, default=1, help="torch threads of TRL's process")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of this project's trainer"
    )
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    parser.add_argument("--cache-dir", help="starter cache (default: $ONLINE_DPO_CACHE, ~/.cache/online-dpo)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR / "vs_trl")
    parser.add_argument("--results", type=Path, help="markdown file to write the section into")
    parser.add_argument("--out", type=Path, help="JSON result file (default: WORK_DIR/vs_trl.json)")
    parser.add_argument("--quick", action="store_true", help="seed 0, 20 steps")
    parser.add_argument(
        "--add-runs", type=Path, nargs="+", default=[], metavar="JSON",
        help="result files of earlier invocations whose runs join this one's tables (a seed's "
        "configurations split over several commands)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        given = argv if argv is not None else sys.argv[1:]
        if "--seeds" not in given:
            args.seeds = QUICK["seeds"]
        if args.steps is None:
            args.steps = QUICK["steps"]
    if args.steps is None:
        from trainer_client.demo import DEMO_DEFAULTS, SIZE_DEFAULTS

        args.steps = {**DEMO_DEFAULTS, **SIZE_DEFAULTS[args.size]}["steps"]
    args.trl_generation = args.trl_generation or (["transformers"] if args.device == "cpu" else ["vllm"])
    if args.trl_fallback is None:
        args.trl_fallback = args.device != "cpu"

    import torch

    torch.set_num_threads(args.torch_threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    print(machine_line(machine), flush=True)
    command = "python bench/vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or args.work_dir / "vs_trl.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rows: list[dict] = []
    t0 = time.monotonic()
    for seed in args.seeds:
        rows += run_seed(seed, args, args.work_dir)
        write_results(out, "vs_trl", machine, settings, {"runs": rows})  # kept if a later seed is cut short
    earlier = [row for path in args.add_runs for row in json.loads(path.read_text())["results"]["runs"]]
    text = results_markdown(earlier + rows, args, machine, command.strip())
    print()
    print(text)
    if args.results:
        write_between_markers(args.results, text, "vs_trl.py")
        print(f"wrote the section into {args.results}")
    print(f"all done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
