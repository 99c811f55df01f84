"""CUDA IPC weight sync on one GPU, per model size, against a device-to-device copy of the same bytes.

The server (a child process) serves the model in bf16 on the GPU; this process holds the same weights in
fp32 on the same GPU, as the trainer's policy. Each round: ``IpcTransport.snapshot`` (pack into bf16
buckets, the training thread's share) and ``push`` (begin, one request per bucket, commit), the server's
``load_seconds`` (pause to resume: every bucket mapped and copied into vLLM's parameters, prefix cache reset),
and the floor: one ``copy_`` of a buffer of the same size on the device, timed in the same round.

    PYTHONPATH=$PWD python bench/ipc_sync_gpu.py --sizes 0.5b 1b 3b --out runs/bench/ipc_sync.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import (
    DEFAULT_WORK_DIR,
    SIZES,
    ServerOptions,
    build_model,
    count_params,
    describe_machine,
    human_params,
    machine_line,
    markdown_table,
    median,
    running_server,
    write_results,
)

PHASES = ("begin", "load", "wait", "finish")


def measure(size: str, rounds: int, bucket_mib: int, work_dir: Path, ipc_load: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer_client.client import GeneratorClient
    from trainer_client.transports.ipc import IpcTransport

    model_dir = build_model(size, "bfloat16", work_dir / "models")
    options = ServerOptions(
        dtype="bfloat16", gpu_memory_utilization=0.35, max_model_len=512, enforce_eager=True,
        extra=("--ipc-load", ipc_load),
    )  # fmt: skip
    log = work_dir / "logs" / f"ipc-{size}-{ipc_load}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with running_server(model_dir, options, log) as server, GeneratorClient(server.url) as client:
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda")
        state = policy.state_dict()
        spec = client.weights_spec()
        dtypes = {n: t.dtype for n, t in spec.tensors.items()}
        transport = IpcTransport(client, bucket_bytes=bucket_mib * 2**20)
        nbytes = sum(state[n].numel() * 2 for n in dtypes)
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        version = spec.weights_version
        rows = []
        for r in range(rounds + 1):  # round 0 warms up (first handle mapping, allocator)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            snapshot = transport.snapshot(state, dtypes)
            t2 = time.perf_counter()
            version += 1
            out = transport.push(snapshot, version)
            t3 = time.perf_counter()
            del snapshot
            if r:
                phases = {f"server_{k}": v for k, v in (out.get("phase_seconds") or {}).items()}
                times = dict(d2d=t1 - t0, snapshot=t2 - t1, push=t3 - t2, load=out["load_seconds"])
                rows.append({**times, **phases})
        assert client.health().weights_version == version
        del policy, state, src, dst
        torch.cuda.empty_cache()
    return {
        "size": size,
        "ipc_load": ipc_load,
        "params": count_params(SIZES[size]),
        "bytes": nbytes,
        "buckets": -(-nbytes // (bucket_mib * 2**20)),
        "rounds": rows,
        **{f"median_{k}": median([row[k] for row in rows]) for k in rows[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "1b", "3b"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bucket-mib", type=int, default=1024)
    parser.add_argument(
        "--ipc-load", nargs="+", default=["layerwise"], choices=["layerwise", "direct"],
        help="the server's --ipc-load, one server per value",
    )  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="one size (0.5b), 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = ["0.5b"], 2
    machine = describe_machine()
    results = [
        measure(size, args.rounds, args.bucket_mib, args.work_dir, mode)
        for size in args.sizes
        for mode in args.ipc_load
    ]
    headers = ["model", "GB (bf16)", "buckets", "--ipc-load", "snapshot s", "push s",
               "server pause-to-resume s", "of which begin / load / wait / finish s", "d2d copy s",
               "push GB/s"]  # fmt: skip
    rows = [
        [f"{r['size']} ({human_params(r['params'])})", r["bytes"] / 1e9, r["buckets"], r["ipc_load"],
         r["median_snapshot"], r["median_push"], r["median_load"],
         " / ".join(f"{r.get(f'median_server_{k}', float('nan')):.3f}" for k in PHASES),
         r["median_d2d"], r["bytes"] / 1e9 / r["median_push"]]
        for r in results
    ]  # fmt: skip
    print(f"## CUDA IPC weight sync, {machine_line(machine)}\n")
    print(markdown_table(headers, rows))
    out = args.out or args.work_dir / "ipc_sync.json"
    write_results(out, "ipc_sync_gpu", machine, vars(args), {"sizes": results})


if __name__ == "__main__":
    main()
