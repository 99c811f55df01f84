"""Colocated mode against server mode: the same online DPO run, peak memory and step time of each.

For each mode the trainer runs as ``python -m trainer_client train`` in a child process with identical
settings except ``mode``:

- ``server``: a generation server (``python -m generator_server``, its own engine process) on the same
  device, started first; weights go over HTTP after every step.
- ``colocate``: no server; the vLLM engine lives inside the trainer process and takes the weights in
  memory (trainer_client/colocate.py).

While a mode runs, this script samples every ``--interval`` seconds the memory of every process involved
(the trainer's process tree, plus the server's tree in server mode): the sum of RSS and the sum of PSS
(proportional set size: shared pages split between the processes that map them, so the sum does not count
shared libraries twice). On a GPU it also samples the device's used memory (``nvidia-smi``), minus what
was in use before the mode started. Step times come from the run's ``metrics.jsonl`` after the first
``--skip`` steps; the time outside the steps is reported apart (the server's start-up in server mode, plus
the trainer process's time outside its steps: imports, model loading, in colocated mode building the
engine, the final checkpoint).

The model is built with the project's own code (``bench/common.py`` sizes), the task is a JSONL of
prompts with the ``length`` reward, so it runs anywhere without downloads.

    PYTHONPATH=$PWD python bench/colocate_vs_server.py --quick                 # CPU, tiny model
    PYTHONPATH=$PWD python bench/colocate_vs_server.py --device cuda --size 0.5b
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import mean

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    SIZES,
    ServerOptions,
    add_common_args,
    bench_device,
    build_model,
    child_env,
    describe_machine,
    machine_line,
    markdown_table,
    median,
    parse_args,
    resolve_dtype,
    running_server,
    write_results,
)

MODES = ("colocate", "server")


# ---------------------------------------------------------------------------------------------------------
# Memory sampling
# ---------------------------------------------------------------------------------------------------------
def gpu_used_mib() -> float | None:
    """Used memory of GPU 0 in MiB, all processes together (``nvidia-smi``); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class MemorySampler:
    """Samples the summed RSS and PSS of some process trees (and GPU memory) in a background thread."""

    def __init__(self, interval: float, gpu: bool):
        self.interval, self.gpu = interval, gpu
        self.roots: list[int] = []
        self.peak_rss = self.peak_pss = 0
        self.gpu_base = gpu_used_mib() if gpu else None
        self.peak_gpu = self.gpu_base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int) -> None:
        self.roots.append(pid)

    def sample(self) -> None:
        rss = pss = 0
        for root in list(self.roots):
            try:
                procs = [psutil.Process(root)]
                procs += procs[0].children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        if self.gpu:
            used = gpu_used_mib()
            if used is not None:
                self.peak_gpu = max(self.peak_gpu or 0.0, used)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def result(self) -> dict:
        out = {"peak_rss_mib": self.peak_rss / 2**20, "peak_pss_mib": self.peak_pss / 2**20}
        if self.gpu and self.peak_gpu is not None and self.gpu_base is not None:
            out["peak_gpu_mib"] = self.peak_gpu - self.gpu_base
        return out


# ---------------------------------------------------------------------------------------------------------
# One mode
# ---------------------------------------------------------------------------------------------------------
def run_mode(mode: str, args, model_dir: Path, task_file: Path, work: Path) -> dict:
    out_dir = work / mode
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    config = dict(
        mode=mode,
        model=str(model_dir),
        device=args.device,
        task=str(task_file),
        reward="length",
        steps=args.steps,
        batch_size=args.batch_size,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        max_staleness=args.max_staleness,
        learning_rate=1e-5,
        progress_bar=False,
        output_dir=str(out_dir),
        seed=args.seed,
        colocate_dtype=args.dtype,
        colocate_enforce_eager=args.enforce_eager,
        colocate_gpu_memory_utilization=args.gpu_memory_utilization,
        colocate_max_model_len=args.max_model_len,
        colocate_kv_cache_gib=args.kv_cache_gib,
        colocate_sleep=not args.no_sleep,
    )
    env = child_env()
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    result: dict = {"mode": mode}
    with MemorySampler(args.interval, gpu=args.device.startswith("cuda")) as sampler:
        with contextlib.ExitStack() as stack:
            if mode == "server":
                options = ServerOptions.from_args(args, args.dtype)
                server = stack.enter_context(running_server(model_dir, options, out_dir / "server.log"))
                sampler.watch(server.proc.pid)
                config["server_url"] = server.url
                result["server_start_seconds"] = server.start_seconds
            config_path = out_dir / "config.yaml"
            config_path.write_text(yaml.safe_dump(config))
            cmd = [sys.executable, "-m", "trainer_client", "train", "--config", str(config_path)]
            print(f"[{mode}] {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            with open(out_dir / "trainer.log", "wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                sampler.watch(proc.pid)
                returncode = proc.wait()
            result["trainer_process_seconds"] = time.perf_counter() - t0
            if returncode != 0:
                tail = (out_dir / "trainer.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"[{mode}] trainer exited with {returncode}:\n{tail}")
    result.update(sampler.result())
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steady = records[args.skip :] or records
    for key in ("wall_seconds", "gen_seconds", "train_seconds", "push_seconds", "overlap_seconds"):
        result[key] = mean(r[key] for r in steady)
    result["mean_staleness"] = mean(r["staleness"] for r in records)
    # the trainer process's time outside its steps: imports, model loading, engine start (colocated), the
    # final checkpoint and shut-down
    stepping = sum(r["wall_seconds"] for r in records)
    result["trainer_outside_steps_seconds"] = result["trainer_process_seconds"] - stepping
    return result


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
QUICK = dict(size="tiny", steps=20, batch_size=16, max_new_tokens=32, enforce_eager=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there is one)")
    parser.add_argument("--size", default="0.5b", choices=sorted(SIZES), help="model size (bench/common.py)")
    parser.add_argument("--model", type=Path, default=None, help="use this model folder instead of --size")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the step-time means")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="engine's share of the GPU")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="CPU: KV cache of the engine in GiB")
    parser.add_argument("--no-sleep", action="store_true", help="colocated on GPU: keep the engine awake")
    parser.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS of the trainer")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (alternating order); medians")
    add_common_args(parser)
    args = parse_args(parser, QUICK, argv)
    args.device = args.device or bench_device()
    if args.device == "cpu" and args.dtype == "auto":
        args.dtype = "float32"
    args.dtype = resolve_dtype(args.dtype)

    work = args.work_dir / "colocate_vs_server"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or build_model(args.size, args.dtype, args.work_dir / "models")
    task_file = work / "prompts.jsonl"
    task_file.write_text("".join(json.dumps({"prompt": f"Count to {i}:"}) + "\n" for i in range(200)))
    machine = describe_machine()
    print(machine_line(machine), flush=True)

    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):  # the order alternates, so a slow patch of a shared machine is spread
        for mode in args.modes if repeat % 2 == 0 else reversed(args.modes):
            runs[mode].append(run_mode(mode, args, model_dir, task_file, work))
    results = {
        mode: {k: median([r[k] for r in rs]) for k in rs[0] if k != "mode"} for mode, rs in runs.items()
    }

    gpu = any("peak_gpu_mib" in r for r in results.values())
    headers = ["mode", "peak RSS (MiB)", "peak PSS (MiB)"] + (["peak GPU (MiB)"] if gpu else [])
    headers += [
        "step (s)",
        "gen (s)",
        "train (s)",
        "push (s)",
        "overlap (s)",
        "staleness",
        "outside steps (s)",
    ]
    rows = []
    for mode, r in results.items():
        outside = r["trainer_outside_steps_seconds"] + r.get("server_start_seconds", 0.0)
        row = [mode, r["peak_rss_mib"], r["peak_pss_mib"]] + ([r.get("peak_gpu_mib", "-")] if gpu else [])
        row += [r["wall_seconds"], r["gen_seconds"], r["train_seconds"], r["push_seconds"]]
        row += [r["overlap_seconds"], r["mean_staleness"], outside]
        rows.append(row)
    print()
    print(markdown_table(headers, rows))
    print(
        f"\nmodel {model_dir} ({args.dtype}), device {args.device}, {args.steps} steps x {args.batch_size} "
        f"prompts x {args.samples_per_prompt} samples x {args.max_new_tokens} tokens, max_staleness "
        f"{args.max_staleness}; step times are means after the first {args.skip} steps; medians of "
        f"{args.repeats} run(s) per mode; "
        "outside steps = server start-up (server mode) + trainer process time outside its steps "
        "(colocated: includes building the engine)"
    )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(
        args.out or work / "colocate_vs_server.json", "colocate_vs_server", machine, settings,
        {"median": results, "runs": runs},
    )  # fmt: skip


if __name__ == "__main__":
    main()
