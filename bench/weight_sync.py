"""Weight sync: the trainer's push of a new policy version, per transport, against its floor.

One server (``python -m generator_server``, a child process) serves a model in bf16; this process holds the
same weights in fp32, as the trainer's policy. Each round runs every transport once, in an order that
rotates from round to round, and each measurement is

- push: what the trainer's pusher pays for one version, ``transport.snapshot(policy, served dtypes)`` +
  ``transport.push(snapshot, version)`` (``push_seconds`` of a synchronous run, plus the snapshot, which the
  trainer takes in its training thread), until the server answers that the version is live;
- floor: moving the same number of bytes the cheapest way the transport could, measured in the same round,
  plus the server's own reload time for that push (the ``load_seconds`` it reports: pause, in-place
  ``reload_weights``, prefix-cache reset, resume), which no transport avoids.

Transports (``TRANSPORTS``: each is one function returning a :class:`Sample`, so ``ipc`` on a GPU is one
more entry):

- ``http``: ``HttpTransport``: a safetensors body streamed from the snapshot's memory with the digest the
  server prefers, ``X-Weights-BLAKE3``, which one thread feeds with each tensor as soon as it is copied
  (the part ``digest`` is how long the push still waits for it after the snapshot). Floor: a raw loopback
  TCP socket from this process to a receiver process (``recv_into`` a reused buffer) sending the
  snapshot's bytes, + ``load_seconds``.
- ``http-chunked``: the same with ``X-Weights-Chunked-SHA256`` (what ``http`` sends to a server that does
  not offer BLAKE3), whose 16 MiB chunks a pool of threads hashes while the snapshot is copied. Same floor.
- ``stream``: ``StreamTransport``: the same snapshot and BLAKE3 digest, the body written to the server's
  raw TCP stream port (which a server opens by default; the benchmark's server runs with no transport
  flags, as a user's would) instead of ``PUT /weights``, the digest given with the commit (so no
  ``digest`` part: the push sends while the hashing ends). Same floor.
- ``http-file``: the client before issue 10: the snapshot written to a temporary safetensors file, hashed
  by reading it, streamed by reading it again (``GeneratorClient.push_weights_file``). Same floor.
- ``shared``: ``SharedFolderTransport``: the snapshot written to a file below the server's
  ``--checkpoint-root``, loaded by ``POST /weights/load``. Floor: reading the same file (``readinto`` a
  preallocated buffer, page cache warm), + ``load_seconds``.

    PYTHONPATH=$PWD python bench/weight_sync.py --quick          # CPU: 25M model (52 MB in bf16), 3 rounds
    PYTHONPATH=$PWD python bench/weight_sync.py                  # 0.25b model (0.51 GB in bf16), 5 rounds

By default the server has no ``--work-dir``, so it receives pushes in memory (``/dev/shm``) when they fit;
``--server-work-dir DIR`` makes it stage them on disk in ``DIR`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    SIZES,
    ServerOptions,
    add_common_args,
    build_model,
    count_params,
    describe_machine,
    has_cuda,
    human_params,
    machine_line,
    markdown_table,
    median,
    parse_args,
    running_server,
    weights_file,
    write_results,
)
from generator_server.tiny_model import TinyModelSpec

# One more rung of the size ladder (move it to bench/common.py's SIZES when another benchmark wants it):
# 257M parameters, 0.51 GB in bf16, the "0.5 GB model" of issue 10.
SIZES.setdefault(
    "0.25b",
    TinyModelSpec(
        hidden_size=1024, num_layers=20, num_heads=16, intermediate_size=2816, max_position_embeddings=1024
    ),
)
QUICK = {"size": "25m", "rounds": 3, "enforce_eager": True}
TARGET = 1.25
READ_CHUNK_BYTES = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--size", default="0.25b", help=f"model size, one of {', '.join(SIZES)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every transport)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--transports", default=None, help=f"comma-separated subset of {', '.join(TRANSPORTS)} (default all)"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch threads of this process, the trainer (1: as the CPU benchmarks run the trainer; two "
        "spin-waiting OpenMP threads on a 2-core machine made the snapshot copy 5x slower)",
    )  # fmt: skip
    parser.add_argument(
        "--server-work-dir", type=Path, default=None,
        help="the server's --work-dir (pushes staged on disk there); default none: in memory when they fit",
    )  # fmt: skip
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="server's share of the GPU")
    parser.add_argument(
        "--policy-device", choices=["cpu", "cuda"], default=None,
        help="where the trainer's fp32 policy lives (default: cuda when there is a GPU, as a GPU trainer's "
        "does; the snapshots of http, http-file and shared then copy from the GPU to pinned memory)",
    )  # fmt: skip
    add_common_args(parser)
    parser.set_defaults(dtype="bfloat16")
    return parser


# ---------------------------------------------------------------------------------------------------------
# The floors' helpers: a raw TCP receiver in another process, a file read
# ---------------------------------------------------------------------------------------------------------


def _receiver(listener: socket.socket) -> None:
    """Accept connections forever; each sends an 8-byte length then that many bytes, answered by one byte."""
    buffer = memoryview(bytearray(4 << 20))
    while True:
        conn, _ = listener.accept()
        with conn:
            (remaining,) = struct.unpack("<Q", conn.recv(8, socket.MSG_WAITALL))
            while remaining:
                n = conn.recv_into(buffer, min(remaining, len(buffer)))
                if not n:
                    break
                remaining -= n
            conn.sendall(b"k")


class SocketFloor:
    """The least an HTTP push of N bytes could cost: a raw loopback TCP stream of them, received by another
    process into a reused buffer (no parsing, hashing, storing)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.process = multiprocessing.get_context("fork").Process(
            target=_receiver, args=(self.listener,), daemon=True
        )
        self.process.start()

    def send(self, chunks: Iterable, nbytes: int) -> float:
        started = time.perf_counter()
        with socket.create_connection(self.address) as conn:
            conn.sendall(struct.pack("<Q", nbytes))
            for chunk in chunks:
                conn.sendall(chunk)
            assert conn.recv(1) == b"k"
        return time.perf_counter() - started

    def close(self) -> None:
        self.process.kill()
        self.process.join()
        self.listener.close()


def read_file(path: Path, buffer: memoryview) -> float:
    """Seconds to read ``path`` into ``buffer`` (unbuffered ``readinto``; capped near 2 GiB per call)."""
    started = time.perf_counter()
    done = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer[done : done + READ_CHUNK_BYTES]):
            done += n
    assert done == path.stat().st_size, (done, path)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------------
# The transports: each one push of a new version, with its floor
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    push_seconds: float
    """snapshot + push, as the trainer does it."""
    floor_seconds: float
    """moving the same bytes the cheapest way + the server's load_seconds."""
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    client: object  # GeneratorClient
    policy: dict  # name -> fp32 tensor: the trainer's live weights
    dtypes: dict[str, str]  # name -> dtype the server serves
    socket_floor: SocketFloor
    shared_dir: Path  # below the server's --checkpoint-root
    read_buffer: memoryview
    version: int
    transports: dict = field(default_factory=dict)  # built once, like the trainer's

    def next_version(self) -> int:
        self.version += 1
        return self.version


def _http(ctx: Context, name: str = "http", digests: list[str] | None = None) -> Sample:
    """``HttpTransport`` with the digest the server prefers, or the first of ``digests`` (or the transport
    already in ``ctx.transports`` under ``name``)."""
    from trainer_client.transports.http import HttpTransport

    if name not in ctx.transports:
        ctx.transports[name] = HttpTransport(ctx.client, digests=digests)
    transport = ctx.transports[name]
    started = time.perf_counter()
    snapshot = transport.snapshot(ctx.policy, ctx.dtypes)
    snapshotted = time.perf_counter()
    parts = {"snapshot": snapshotted - started}
    if name != "stream":  # (a stream push gives the digest with its commit: it sends meanwhile)
        snapshot.digest.result()  # what push() waits for first (timed apart; push finds it done)
        parts["digest"] = time.perf_counter() - snapshotted
    out = transport.push(snapshot, ctx.next_version())
    push = time.perf_counter() - started
    body = snapshot.body
    socket_seconds = ctx.socket_floor.send(body.chunks(), body.nbytes)
    parts |= {"socket": socket_seconds, "load": out["load_seconds"]}
    if out.get("receive_seconds") is not None:  # the server's side of the upload, for the push's breakdown
        parts["server_receive"] = out["receive_seconds"]
    return Sample(push, socket_seconds + out["load_seconds"], parts | {"bytes": body.nbytes})


def _stream(ctx: Context) -> Sample:
    """``StreamTransport``: ``http``'s snapshot and BLAKE3, the body on the server's stream port."""
    from trainer_client.transports.stream import StreamTransport

    ctx.transports.setdefault("stream", StreamTransport(ctx.client))
    return _http(ctx, "stream")


def _http_chunked(ctx: Context) -> Sample:
    return _http(ctx, "http-chunked", digests=["chunked-sha256"])


def _http_file(ctx: Context) -> Sample:
    """The trainer's HTTP push before issue 10 (``push_weights`` of that time, verbatim)."""
    from safetensors.torch import save_file

    from trainer_client.client import SafetensorsBody
    from trainer_client.transports.base import host_snapshot

    started = time.perf_counter()
    snapshot = host_snapshot(ctx.policy, ctx.dtypes)
    snapshotted = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "push.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in snapshot.items()}, path)
        out = ctx.client.push_weights_file(path, ctx.next_version()).model_dump()
    push = time.perf_counter() - started
    body = SafetensorsBody(snapshot)
    socket_seconds = ctx.socket_floor.send(body.chunks(), body.nbytes)
    parts = {"snapshot": snapshotted - started, "socket": socket_seconds, "load": out["load_seconds"]}
    return Sample(push, socket_seconds + out["load_seconds"], parts | {"bytes": body.nbytes})


def _shared(ctx: Context) -> Sample:
    from trainer_client.transports.shared import SharedFolderTransport

    transport = ctx.transports.setdefault("shared", SharedFolderTransport(ctx.client, str(ctx.shared_dir)))
    version = ctx.next_version()
    started = time.perf_counter()
    snapshot = transport.snapshot(ctx.policy, ctx.dtypes)
    snapshotted = time.perf_counter()
    out = transport.push(snapshot, version)
    push = time.perf_counter() - started
    path = ctx.shared_dir / f"weights-v{version:08d}.safetensors"
    read_seconds = read_file(path, ctx.read_buffer)
    parts = {"snapshot": snapshotted - started, "read": read_seconds, "load": out["load_seconds"]}
    return Sample(push, read_seconds + out["load_seconds"], parts | {"bytes": path.stat().st_size})


def _ipc(ctx: Context) -> Sample:
    """CUDA IPC (GPU only): the policy on the server's GPU, packed into bf16 buckets whose handles go over
    HTTP as JSON. Floor: one device-to-device copy of the same bytes + the server's reload."""
    import torch

    from trainer_client.transports.ipc import IpcTransport

    transport = ctx.transports.setdefault("ipc", IpcTransport(ctx.client))
    policy = ctx.transports.setdefault("ipc-policy", {n: t.to("cuda") for n, t in ctx.policy.items()})
    started = time.perf_counter()
    snapshot = transport.snapshot(policy, ctx.dtypes)
    snapshotted = time.perf_counter()
    out = transport.push(snapshot, ctx.next_version())
    push = time.perf_counter() - started
    nbytes = sum(b.buffer.numel() for b in snapshot)
    src = snapshot[0].buffer.new_empty(nbytes)
    dst = torch.empty_like(src)
    torch.cuda.synchronize()
    copy_started = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize()
    copy_seconds = time.perf_counter() - copy_started
    del snapshot, src, dst
    parts = {"snapshot": snapshotted - started, "copy": copy_seconds, "load": out["load_seconds"]}
    return Sample(push, copy_seconds + out["load_seconds"], parts | {"bytes": nbytes})


TRANSPORTS: dict[str, Callable[[Context], Sample]] = {
    "http": _http,
    "http-chunked": _http_chunked,
    "stream": _stream,
    "http-file": _http_file,
    "shared": _shared,
    "ipc": _ipc,
}
"""name -> one push of a new version with its floor (``ipc`` runs only where there is a GPU)."""
FLOORS = {
    "http": "loopback TCP socket + server reload",
    "http-chunked": "loopback TCP socket + server reload",
    "stream": "loopback TCP socket + server reload",
    "http-file": "loopback TCP socket + server reload",
    "shared": "file read + server reload",
    "ipc": "device-to-device copy + server reload",
}


# ---------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------


def run_rounds(args, names: list[str], model_dir: Path, checkpoint_root: Path) -> dict[str, list[Sample]]:
    """Start the server, then ``warmup + rounds`` rounds of every transport in ``names``, order rotating."""
    import torch
    from safetensors.torch import load_file

    from trainer_client.client import GeneratorClient

    options = ServerOptions(
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        checkpoint_root=checkpoint_root,
        work_dir=args.server_work_dir,
        seed=args.seed,
    )  # (no transport flags: the server opens its stream port by default, as a user's does)
    policy = {
        n: (t.float() if t.is_floating_point() else t).to(args.policy_device)
        for n, t in load_file(weights_file(model_dir)).items()
    }
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        socket_floor = SocketFloor()
        stack.callback(socket_floor.close)
        log_path = args.work_dir / "logs" / "weight_sync-server.log"
        server = stack.enter_context(running_server(model_dir, options, log_path))
        client = stack.enter_context(GeneratorClient(server.url, timeout=1800.0, max_retries=0))
        spec = client.weights_spec()
        ctx = Context(
            client=client,
            policy=policy,
            dtypes={n: s.dtype for n, s in spec.tensors.items()},
            socket_floor=socket_floor,
            shared_dir=checkpoint_root / "pushed",
            read_buffer=memoryview(
                torch.empty(sum(t.nbytes for t in policy.values()) + 2**20, dtype=torch.uint8).numpy()
            ),
            version=spec.weights_version,
        )
        for r in range(args.warmup + args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sample = TRANSPORTS[name](ctx)
                parts = ", ".join(f"{k} {v:.3f}" for k, v in sample.parts.items() if k != "bytes")
                note = " (warm-up)" if r < args.warmup else ""
                push, floor = sample.push_seconds, sample.floor_seconds
                print(
                    f"  round {r} {name}: push {push:.3f} s, floor {floor:.3f} s ({parts}){note}", flush=True
                )
                if r >= args.warmup:
                    samples[name].append(sample)
        for transport in [t for t in ctx.transports.values() if hasattr(t, "close")]:
            transport.close()
    return samples


def hash_seconds(nbytes: int) -> dict[str, float]:
    """Seconds each digest takes over ``nbytes`` here: hashlib's SHA-256 in one thread, BLAKE3 in one
    thread and on every core (the client hashes every body once, the server once more)."""
    import hashlib

    import blake3
    import torch

    data = memoryview(torch.ones(nbytes, dtype=torch.uint8).numpy())
    hashers = {
        "sha256": hashlib.sha256,
        "blake3": blake3.blake3,
        "blake3_all_cores": lambda: blake3.blake3(max_threads=blake3.blake3.AUTO),
    }
    seconds = {}
    for name, new in hashers.items():
        hasher = new()
        started = time.perf_counter()
        hasher.update(data)
        hasher.hexdigest()
        seconds[name] = time.perf_counter() - started
    return seconds


def summarize(samples: dict[str, list[Sample]]) -> list[dict]:
    rows = []
    for name, runs in samples.items():
        push, floor = [s.push_seconds for s in runs], [s.floor_seconds for s in runs]
        parts = {k: median([s.parts[k] for s in runs]) for k in runs[0].parts}
        rows.append(
            {
                "transport": name,
                "floor": FLOORS[name],
                "bytes": int(parts.pop("bytes")),
                "push_seconds": median(push),
                "floor_seconds": median(floor),
                "ratio": median(push) / median(floor),
                "ratio_best": min(push) / min(floor),
                "median_parts_seconds": parts,
                "push_samples": push,
                "floor_samples": floor,
            }
        )
    return rows


def markdown(args, machine: dict, rows: list[dict], hashing: dict[str, float]) -> str:
    from trainer_client.client import DIGEST_CHUNK_BYTES

    table = []
    for row in rows:
        parts = row["median_parts_seconds"]
        table.append(
            [row["transport"], f"{row['bytes'] / 1e9:.3f}", row["push_seconds"], parts["snapshot"],
             parts.get("server_receive", ""), row["floor_seconds"],
             parts.get("socket", parts.get("read", parts.get("copy"))), parts["load"],
             f"{row['ratio']:.2f}", f"{row['ratio_best']:.2f}", row["floor"]]
        )  # fmt: skip
    headers = ["transport", "GB", "push s", "of which snapshot s", "server receiving s", "floor s",
               "bytes moved s", "server reload s", "push / floor", "best / best", "floor is"]  # fmt: skip
    staging = f"on disk ({args.server_work_dir})" if args.server_work_dir else "auto (in memory when it fits)"
    params = human_params(count_params(SIZES[args.size]))
    return "\n".join(
        [
            f"## Weight sync: {args.size} model ({params} params), served in {args.dtype}",
            "",
            f"Machine: {machine_line(machine)}",
            "",
            f"Median of {args.rounds} rounds after {args.warmup} warm-up, transports in rotating order; "
            f"trainer torch threads {args.torch_threads}, policy on {args.policy_device}; server staging "
            f"{staging}. push = snapshot + push as the trainer does it; server receiving = the body's "
            "first read to its last byte staged and checked (the server's receive_seconds); floor = moving "
            "the bytes + the server's reload (its load_seconds); "
            "best / best = fastest push against fastest floor.",
            "",
            markdown_table(headers, table),
            "",
            f"Hashing {rows[0]['bytes'] / 1e9:.3f} GB here: SHA-256 {hashing['sha256']:.3f} s in one thread, "
            f"BLAKE3 {hashing['blake3']:.3f} s in one thread, {hashing['blake3_all_cores']:.3f} s on every "
            "core (an HTTP push hashes the body twice, the client while it copies the snapshot and the "
            f"server while receiving; the chunked SHA-256 in {DIGEST_CHUNK_BYTES >> 20} MiB chunks on "
            f"several threads). Target: push within {TARGET}x of its floor.",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), QUICK, argv)
    default = [n for n in TRANSPORTS if n != "ipc" or has_cuda()]  # CUDA IPC needs a GPU
    names = args.transports.split(",") if args.transports else default
    if unknown := [n for n in names if n not in TRANSPORTS] + ([args.size] if args.size not in SIZES else []):
        raise SystemExit(f"unknown transport or size: {unknown}")
    import torch

    torch.set_num_threads(args.torch_threads)
    args.policy_device = args.policy_device or ("cuda" if has_cuda() else "cpu")
    out = args.out or args.work_dir / "weight_sync.json"
    machine = describe_machine()
    print(f"machine: {machine_line(machine)}", flush=True)
    model_dir = build_model(args.size, args.dtype, args.work_dir / "models")
    checkpoint_root = args.work_dir / "sync-checkpoints"
    checkpoint_root.mkdir(parents=True, exist_ok=True)

    rows = summarize(run_rounds(args, names, model_dir, checkpoint_root))
    hashing = hash_seconds(rows[0]["bytes"])
    settings = vars(args) | {"params": count_params(SIZES[args.size])}
    results = {"transports": rows, "target_ratio": TARGET, "sha256_seconds": hashing["sha256"]}
    results["hash_seconds"] = hashing
    write_results(out, "weight_sync", machine, settings, results)
    text = markdown(args, machine, rows, hashing)
    print("\n" + text)
    out.with_suffix(".md").write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
