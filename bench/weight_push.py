"""Benchmark 3: weight push + reload, against the floor of moving the same bytes through the same path.

For each model size, one server (``python -m generator_server``, a child process) serves the model, and
each repeat measures, side by side:

- push: ``PUT /weights`` of the model's safetensors file, streamed from disk in 1 MiB chunks with its
  SHA-256 header, exactly as the trainer's ``GeneratorClient.push_weights_file`` sends it, until the server
  answers that the new version is live (stream to disk, digest and shape checks, in-place reload).
- push floor: the same file uploaded the same way to a sink (``bench/http_sink.py``, uvicorn + FastAPI,
  body written to a file on the same disk), plus reading that file back into device memory: ``readinto``
  a preallocated (pinned, on a GPU) host buffer and one copy to a preallocated device buffer. Nothing
  can push and load those bytes much faster than that.
- load: ``POST /weights/load`` of the same file on the server's disk (the shared-volume deployment).
- load floor: reading the file into device memory as above.

Also reported as context: ``safetensors.torch.load_file(path, device=...)`` of the same file (a typical
library read), the client's SHA-256 of the file and the trainer-side write (device state dict to a
safetensors file). Files are in the page cache for every side (just written or just read), so the
floors are warm-cache floors. The target is push and load within 2x of their floors. For scale: TRL's vLLM
server, which broadcasts tensor by tensor over NCCL, took about 0.6 s for a 0.5B model (not measured here).

    PYTHONPATH=$PWD python bench/weight_push.py                     # GPU defaults: 0.1b, 0.5b, 1b
    PYTHONPATH=$PWD python bench/weight_push.py --quick             # CPU: 0.5M and 25M models
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx

from bench.common import (
    SIZES,
    ServerOptions,
    add_common_args,
    bench_device,
    build_model,
    count_params,
    describe_machine,
    has_cuda,
    human_params,
    machine_line,
    markdown_table,
    median,
    parse_args,
    resolve_dtype,
    running_server,
    running_sink,
    sync_device,
    weights_file,
    write_results,
)
from trainer_client.client import CHUNK_BYTES, GeneratorClient, sha256_file

QUICK = {"sizes": "tiny,25m", "repeats": 2, "enforce_eager": True}
TARGET = 2.0
READ_CHUNK_BYTES = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument(
        "--sizes", default="0.1b,0.5b,1b", help=f"comma-separated model sizes from {', '.join(SIZES)}"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per size (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats per size first")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="server's share of the GPU")
    add_common_args(parser)
    return parser


# ---------------------------------------------------------------------------------------------------------
# The measured operations
# ---------------------------------------------------------------------------------------------------------


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    sync_device()
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    sync_device()
    return time.perf_counter() - started, result


def _file_chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def upload_to_sink(client: httpx.Client, path: Path) -> int:
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)}
    response = client.put("/sink", content=_file_chunks(path), headers=headers)
    response.raise_for_status()
    return response.json()["bytes"]


def floor_buffers(nbytes: int):
    """(host, device) byte buffers for the read floor, allocated once per size, outside the timings."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=has_cuda())
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda") if has_cuda() else None
    return host, device


def read_floor(path: Path, host, device) -> int:
    """The least work that puts a file's bytes in device memory: read it into a host buffer (unbuffered
    ``readinto``; reads are capped near 2 GiB per call) and, on a GPU, one copy to device memory."""
    view = memoryview(host.numpy())
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < len(view):
            n = f.readinto(view[done : done + READ_CHUNK_BYTES])
            if not n:
                break
            done += n
    if device is not None:
        device.copy_(host)
    return done


def library_read(path: Path) -> dict:
    """The tensors in device memory the usual way. On a CPU ``load_file`` only maps the file (pages are
    read on first touch), so the tensors are copied out once, as the engine's reload copies them."""
    from safetensors.torch import load_file

    tensors = load_file(path, device=bench_device())
    if bench_device() == "cpu":
        tensors = {name: t.clone() for name, t in tensors.items()}
    return tensors


def write_state_dict(state_dict: dict, path: Path) -> None:
    """What the trainer does before a push: device tensors to host, one safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path)


def measure_size(size: str, dtype: str, args, sink_url: str, sink_file: Path) -> dict:
    models_root = args.work_dir / "models"
    model_dir = build_model(size, dtype, models_root)
    wfile = weights_file(model_dir)
    nbytes = wfile.stat().st_size
    sha_seconds, digest = _timed(sha256_file, wfile)
    scratch = args.work_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    options = ServerOptions(
        dtype=dtype,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        checkpoint_root=models_root,
        work_dir=args.work_dir / "server-work" / size,  # same disk as the sink's file
        seed=args.seed,
    )
    log_path = args.work_dir / "logs" / f"weight_push-{size}-server.log"
    timings: dict[str, list[float]] = {k: [] for k in ("sink", "read", "push", "load", "st_read", "write")}
    host, device = floor_buffers(nbytes)
    server_load: dict[str, list[float]] = {"push": [], "load": []}
    with (
        running_server(model_dir, options, log_path) as server,
        GeneratorClient(server.url, timeout=1800.0, max_retries=0) as gen,
        httpx.Client(base_url=sink_url, timeout=httpx.Timeout(1800.0)) as sink,
    ):
        version = gen.health().weights_version
        for r in range(args.warmup + args.repeats):
            t_sink, received = _timed(upload_to_sink, sink, wfile)
            assert received == nbytes, (received, nbytes)
            t_read, got = _timed(read_floor, sink_file, host, device)
            assert got == nbytes, (got, nbytes)
            t_st_read, state_dict = _timed(library_read, sink_file)
            t_write, _ = _timed(write_state_dict, state_dict, scratch / "write.safetensors")
            del state_dict
            version += 1
            t_push, pushed = _timed(gen.push_weights_file, wfile, version, sha256=digest)
            version += 1
            t_load, loaded = _timed(gen.load_weights, str(wfile), version)
            assert gen.health().weights_version == version
            note = "" if r >= args.warmup else " (warm-up)"
            print(
                f"  {size} repeat {r}: push {t_push:.3f} s (server load {pushed.load_seconds}), sink "
                f"{t_sink:.3f} s, read {t_read:.3f} s; load {t_load:.3f} s (server {loaded.load_seconds}); "
                f"load_file {t_st_read:.3f} s, write {t_write:.3f} s{note}",
                flush=True,
            )
            if r < args.warmup:
                continue
            for key, value in zip(timings, (t_sink, t_read, t_push, t_load, t_st_read, t_write), strict=True):
                timings[key].append(value)
            server_load["push"].append(pushed.load_seconds)
            server_load["load"].append(loaded.load_seconds)
        (scratch / "write.safetensors").unlink(missing_ok=True)
        del host, device

    med = {k: median(v) for k, v in timings.items()}
    best = {k: min(v) for k, v in timings.items()}
    push_floor = med["sink"] + med["read"]
    return {
        "size": size,
        "params": count_params(SIZES[size]),
        "dtype": dtype,
        "bytes": nbytes,
        "server_start_seconds": server.start_seconds,
        "sha256_seconds": sha_seconds,
        "median_seconds": med,
        "push_floor_seconds": push_floor,
        "push_ratio": med["push"] / push_floor,
        "load_floor_seconds": med["read"],
        "load_ratio": med["load"] / med["read"],
        # Fastest repeat against fastest floor: steadier than medians on a shared, noisy machine.
        "push_ratio_best": best["push"] / (best["sink"] + best["read"]),
        "load_ratio_best": best["load"] / best["read"],
        "server_reported_load_seconds": {k: median(v) for k, v in server_load.items() if None not in v},
        "push_gb_per_s": nbytes / 1e9 / med["push"],
        "load_gb_per_s": nbytes / 1e9 / med["load"],
        "timings": timings,
    }


# ---------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), QUICK, argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    dtype = resolve_dtype(args.dtype)
    out = args.out or args.work_dir / "weight_push.json"
    machine = describe_machine()
    print(f"machine: {machine_line(machine)}", flush=True)

    sink_file = args.work_dir / "sink" / "upload.safetensors"
    rows = []
    with running_sink(sink_file, args.work_dir / "logs" / "http_sink.log") as sink:
        for size in sizes:
            rows.append(measure_size(size, dtype, args, sink.url, sink_file))
            # Written after every size, so that a later size failing (or a time limit) keeps the earlier.
            results = {"sizes": rows, "target_ratio": TARGET, "trl_nccl_0_5b_seconds_context": 0.6}
            write_results(out, "weight_push", machine, vars(args) | {"dtype": dtype}, results)
    sink_file.unlink(missing_ok=True)

    def ok(ratio: float) -> str:
        return f"{ratio:.2f}" + ("" if ratio <= TARGET else " (over 2x)")

    push_rows, load_rows = [], []
    for r in rows:
        m, name = r["median_seconds"], f"{r['size']} ({human_params(r['params'])})"
        gb, swap = r["bytes"] / 1e9, r["server_reported_load_seconds"]
        push_rows.append(
            [name, f"{gb:.3f}", m["push"], r["push_gb_per_s"], m["sink"], m["read"], r["push_floor_seconds"],
             ok(r["push_ratio"]), f"{r['push_ratio_best']:.2f}", swap.get("push", "-")]
        )  # fmt: skip
        load_rows.append(
            [name, f"{gb:.3f}", m["load"], r["load_gb_per_s"], m["read"], ok(r["load_ratio"]),
             f"{r['load_ratio_best']:.2f}", swap.get("load", "-"), m["st_read"], m["write"],
             r["sha256_seconds"]]
        )  # fmt: skip
    print(f"\n## Benchmark 3: weight push + reload\n\nMachine: {machine_line(machine)}")
    print(
        f"dtype {dtype}, median of {args.repeats} repeats after {args.warmup} warm-up (best / best: fastest "
        f"repeat against fastest floor), vLLM "
        f"enforce_eager={args.enforce_eager}, device for the read floor: {bench_device()}\n"
    )
    print("### PUT /weights (push + reload) vs HTTP upload to a sink + read back\n")
    print(
        markdown_table(
            ["model", "GB", "push s", "push GB/s", "sink upload s", "read s", "floor s", "push / floor",
             "best / best", "server load_seconds"],
            push_rows,
        )
    )  # fmt: skip
    print("\n### POST /weights/load (from the server's disk) vs reading the file\n")
    print(
        markdown_table(
            ["model", "GB", "load s", "load GB/s", "read s (floor)", "load / floor", "best / best",
             "server load_seconds", "load_file s", "trainer write s", "client sha256 s"],
            load_rows,
        )
    )  # fmt: skip
    print(
        f"\nTarget: within {TARGET:.0f}x of the floor. "
        "Context: TRL's per-tensor NCCL path took ~0.6 s for 0.5B."
    )
    return results


if __name__ == "__main__":
    main()
