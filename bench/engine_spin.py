"""What vLLM's spinning wait costs a CPU server and the trainer beside it.

On the CPU, vLLM's engine core hands each step to its worker process through a shared-memory queue and, by
default, polls the queue for the worker's answer in a loop (yielding the core between polls) for up to a
second before it sleeps; a CPU step takes long enough that it never sleeps while generating. The server
now sleeps a millisecond between polls on the CPU (``ONLINE_DPO_ENGINE_POLL_PAUSE``,
generator_server/engine_plugin.py). This benchmark starts the server
on SmolLM2-135M-Instruct (fetched and converted once, as the demo does) with each setting in turn, several
times alternating, and while a busy neighbour process stands for the trainer, sends the demo's generation
request (4 chat prompts x 8 samples, up to 48 new tokens, temperature 0.7, seeded: what the demo's server
answers each step). Per setting it reports the request's time, the CPU the engine-core process used
during it, and the work the neighbour got done, against its rate on the same machine with the server idle.

    PYTHONPATH=$PWD python bench/engine_spin.py                 # 2-core CPU: about 6 minutes
    PYTHONPATH=$PWD python bench/engine_spin.py --rounds 3 --requests 6
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import httpx

from bench.common import (
    DEFAULT_WORK_DIR,
    ServerOptions,
    describe_machine,
    machine_line,
    markdown_table,
    running_server,
    write_results,
)
from bench.generate_blocks import chat_prompts
from generator_server.engine_plugin import CPU_POLL_PAUSE, POLL_ENV

SETTINGS = {"with 1 ms pauses (the CPU default now)": str(CPU_POLL_PAUSE), "spinning (vLLM's own)": "0"}
WORK_UNIT = 10_000


def _neighbour(stop, done) -> None:
    """A process that keeps one core busy, counting the units of work it gets done."""
    while not stop.is_set():
        for _ in range(100):
            sum(range(WORK_UNIT))
        with done.get_lock():
            done.value += 100


@contextlib.contextmanager
def neighbour():
    ctx = multiprocessing.get_context("spawn")
    stop, done = ctx.Event(), ctx.Value("q", 0)
    process = ctx.Process(target=_neighbour, args=(stop, done), daemon=True)
    process.start()
    try:
        time.sleep(1.0)  # (started and busy)
        yield done
    finally:
        stop.set()
        process.join(10)


def rate(done, seconds: float) -> float:
    """The neighbour's units of work a second over the next ``seconds``."""
    before, started = done.value, time.perf_counter()
    time.sleep(seconds)
    return (done.value - before) / (time.perf_counter() - started)


def engine_core_seconds(server_pid: int) -> float:
    """CPU seconds used so far by the server's engine-core process (vLLM names it ``VLLM::EngineCore``)."""
    import psutil

    total = 0.0
    for child in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name().startswith("VLLM::EngineCor"):
                times = child.cpu_times()
                total += times.user + times.system
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="servers per setting, the settings alternating")
    parser.add_argument("--requests", type=int, default=4, help="timed requests per server")
    parser.add_argument("--model", default=None, help="model folder or GGUF file (default: SmolLM2)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from generator_server.gguf_model import resolve_model
    from trainer_client.pretrained import fetch_smollm2

    model_dir = Path(resolve_model(args.model or str(fetch_smollm2())))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    options = ServerOptions(dtype="auto", enforce_eager=True, max_model_len=1024)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"request_s": [], "engine_core_cpu": [], "neighbour": []} for name in SETTINGS
    }
    saved = os.environ.get(POLL_ENV)
    try:
        for round_ in range(args.rounds):
            for name, value in SETTINGS.items():
                os.environ[POLL_ENV] = value
                log_path = args.work_dir / "logs" / f"engine_spin_{value}.log"  # (pause in seconds)
                with (
                    running_server(model_dir, options, log_path) as server,
                    httpx.Client(base_url=server.url, timeout=600) as client,
                    neighbour() as done,
                ):
                    client.post("/generate", json={"prompts": ["Hi"], "max_tokens": 2})  # (warm-up)
                    alone = rate(done, 3.0)  # the neighbour's rate with the server idle
                    for i in range(args.requests):
                        body = {
                            "prompts": chat_prompts(tokenizer, 4, 1000 * round_ + 4 * i),
                            "n": 8,
                            "max_tokens": 48,
                            "temperature": 0.7,
                            "seed": i,
                        }
                        cpu_before, work_before = engine_core_seconds(server.proc.pid), done.value
                        started = time.perf_counter()
                        client.post("/generate", json=body).raise_for_status()
                        seconds = time.perf_counter() - started
                        cpu = engine_core_seconds(server.proc.pid) - cpu_before
                        samples[name]["request_s"].append(seconds)
                        samples[name]["engine_core_cpu"].append(cpu / seconds)
                        samples[name]["neighbour"].append((done.value - work_before) / seconds / alone)
                    print(
                        f"  round {round_} {name}: requests {samples[name]['request_s'][-args.requests :]}",
                        flush=True,
                    )
    finally:
        if saved is None:
            os.environ.pop(POLL_ENV, None)
        else:
            os.environ[POLL_ENV] = saved
    rows = [
        [
            name,
            statistics.median(s["request_s"]),
            min(s["request_s"]),
            max(s["request_s"]),
            statistics.median(s["engine_core_cpu"]),
            statistics.median(s["neighbour"]),
        ]
        for name, s in samples.items()
    ]
    machine = describe_machine()
    print(
        f"\n{machine_line(machine)}; {model_dir.name}; {args.rounds} servers per setting, {args.requests} "
        "requests each (4 chat prompts x 8 samples x up to 48 tokens), one busy neighbour process"
    )
    headers = [
        "engine processes wait", "request s (median)", "min s", "max s",
        "engine core's CPU (cores)", "neighbour's work (of its rate, server idle)",
    ]  # fmt: skip
    print(markdown_table(headers, rows))
    write_results(args.out or args.work_dir / "engine_spin.json", "engine_spin", machine, vars(args), samples)


if __name__ == "__main__":
    main()
