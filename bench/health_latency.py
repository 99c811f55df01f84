"""How promptly the server answers ``GET /health`` and ``GET /metrics`` while its engine generates.

A container health check or a trainer's readiness poll calls a server that does not answer within a
second or two dead. This benchmark starts the server, polls both routes on an idle engine, then again
while a long ``POST /generate`` (many prompts, fixed length) keeps the engine busy, optionally with CPU
hogs (busy-looping processes, one per ``--hogs``) beside it to stand for a loaded machine, and reports the
latency of each poll: median, 99th percentile and worst, idle against busy.

    PYTHONPATH=$PWD python bench/health_latency.py --quick            # tiny model, CPU, ~2 min
    PYTHONPATH=$PWD python bench/health_latency.py --quick --hogs 2   # the same on a loaded machine
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import threading
import time

import httpx

from bench.common import (
    ServerOptions,
    add_common_args,
    build_model,
    describe_machine,
    machine_line,
    markdown_table,
    parse_args,
    resolve_dtype,
    running_server,
    write_results,
)

API_KEY = "bench"


def _hog(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextlib.contextmanager
def cpu_hogs(count: int):
    """``count`` processes that keep a core busy each, as other work on a loaded machine would."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_hog, args=(stop,), daemon=True) for _ in range(count)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def poll(url: str, seconds: float, interval: float, busy: threading.Event | None = None) -> dict:
    """Poll /health and /metrics for ``seconds`` (or while ``busy`` is set): latency of every answer."""
    latencies: dict[str, list[float]] = {"/health": [], "/metrics": []}
    slow: list[tuple[str, float, float]] = []  # (route, seconds since polling began, latency) over 0.5 s
    failures: list[str] = []
    began = time.perf_counter()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, headers=headers, timeout=60.0) as client:
        while time.monotonic() < deadline and (busy is None or busy.is_set()):
            for path in latencies:
                started = time.perf_counter()
                try:
                    response = client.get(path)
                    if response.status_code != 200:
                        failures.append(f"{path}: {response.status_code}")
                except httpx.HTTPError as e:
                    failures.append(f"{path}: {e!r}")
                latencies[path].append(time.perf_counter() - started)
                if latencies[path][-1] > 0.5:
                    slow.append((path, round(started - began, 2), round(latencies[path][-1], 3)))
            time.sleep(interval)
    return {"latencies": latencies, "failures": failures, "slow": slow}


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "polls": len(ordered),
        "median_s": statistics.median(ordered) if ordered else None,
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
        "max_s": ordered[-1] if ordered else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--size", default="0.1b", help="model size (bench/common.py SIZES)")
    parser.add_argument("--prompts", type=int, default=1024, help="prompts in the long request")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per completion (ignore_eos)")
    parser.add_argument("--requests", type=int, default=1, help="long requests sent at once")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="polling before the long request")
    parser.add_argument("--interval", type=float, default=0.1, help="pause between polls, seconds")
    parser.add_argument("--hogs", type=int, default=0, help="busy-looping processes beside the server")
    args = parse_args(parser, {"size": "tiny", "enforce_eager": True, "prompts": 2048}, argv)
    dtype = resolve_dtype(args.dtype)
    model_dir = build_model(args.size, dtype, args.work_dir / "models")
    options = ServerOptions(
        dtype=dtype,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len or 512,
        extra=("--api-key", API_KEY),
    )
    log_path = args.work_dir / "logs" / "health_latency_server.log"
    request = {
        "prompt_token_ids": [[1 + i % 100, 2, 3, 4] for i in range(args.prompts)],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": 0,
    }
    with running_server(model_dir, options, log_path) as server, cpu_hogs(args.hogs):
        idle = poll(server.url, args.idle_seconds, args.interval)
        busy, generated = threading.Event(), []
        busy.set()

        def long_request() -> None:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
                started = time.perf_counter()
                response = c.post("/generate", json=request, timeout=3600)
                generated.append((response.status_code, time.perf_counter() - started))

        threads = [threading.Thread(target=long_request) for _ in range(args.requests)]
        for t in threads:
            t.start()

        def end_busy() -> None:
            for t in threads:
                t.join()
            busy.clear()

        threading.Thread(target=end_busy, daemon=True).start()
        during = poll(server.url, 3600, args.interval, busy)
    rows, results = [], {"generate": generated, "idle": {}, "busy": {}}
    for phase, measured in (("idle", idle), ("busy", during)):
        for path, values in measured["latencies"].items():
            s = summary(values)
            results[phase][path] = {**s, "failures": measured["failures"]}
            rows.append([phase, path, s["polls"], s["median_s"], s["p99_s"], s["max_s"]])
    machine = describe_machine()
    print(f"\n{machine_line(machine)}; {args.size} model, {args.requests} x {args.prompts} prompts x "
          f"{args.max_tokens} tokens, {args.hogs} CPU hogs; /generate: {generated}")  # fmt: skip
    print(markdown_table(["engine", "route", "polls", "median s", "p99 s", "max s"], rows))
    failures = idle["failures"] + during["failures"]
    if failures:
        print(f"failed polls: {failures[:5]}")
    print(f"polls over 0.5 s while busy (route, seconds after the request, latency): {during['slow'][:20]}")
    results["slow"] = during["slow"]
    out = args.out or args.work_dir / "health_latency.json"
    write_results(out, "health_latency", machine, vars(args), results)


if __name__ == "__main__":
    main()
