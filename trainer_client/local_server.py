"""Start a generation server as a child process for the length of a ``with`` block: the one launcher.

    with local_server("models/starter", log_path="runs/demo/server.log") as url:
        ...  # talk to the server at url

``local_server`` is what ``trainer-client demo`` and ``trainer-client eval`` (without ``--server-url``) use;
the tests (tests/server_process.py) and the benchmarks (bench/common.py) start their servers, and any other
HTTP child, with :func:`launched`, which it is built on. A child runs in its own process group, so stopping
it also stops the vLLM engine processes it spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The server process exited or did not become healthy in time."""


@contextmanager
def pinned_to_spare_core(enabled: bool = True) -> Iterator[None]:
    """Run the ``with`` block (and the threads it starts) on the last allowed CPU only.

    vLLM's CPU worker binds its threads to all cores but the last, which it leaves free; a single-threaded
    trainer placed there does not fight the engine for a core while they overlap (measured on 2 cores:
    0.52-0.55 s per asynchronous demo step pinned, 0.60 s unpinned; synchronous steps are unaffected)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not enabled or len(allowed) < 2:
        yield
        return
    os.sched_setaffinity(0, {max(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path | None
    start_seconds: float = 0.0
    """Seconds from launch until the ready route answered 200."""


def server_command(model: str | Path, *args: str) -> list[str]:
    """``python -m generator_server --model MODEL ARGS...`` (a flag given twice: the last one counts)."""
    return [sys.executable, "-m", "generator_server", "--model", str(model), *args]


@contextmanager
def launched(
    cmd: list[str],
    url: str,
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    timeout: float = 600.0,
    ready_path: str = "/health",
    grace: float = 20.0,
) -> Iterator[ServerProcess]:
    """Run ``cmd`` in a process group of its own, its output to ``log_path`` (default: discarded), with
    ``env`` as its whole environment (default: this process's); yield once ``GET url + ready_path`` answers
    200, and stop the group (:func:`stop_process_group`) when the block ends, however it ends. Raise
    :class:`ServerStartError` with the end of the log if the process exits first or is not ready within
    ``timeout`` seconds."""
    log_path = Path(log_path) if log_path is not None else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log_file = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        if log_path is not None:
            log_file.close()  # (the child holds its own copy)
    try:
        _wait_ready(proc, url + ready_path, started, timeout, log_path)
        yield ServerProcess(url, proc, log_path, time.monotonic() - started)
    finally:
        stop_process_group(proc, grace)


def _wait_ready(
    proc: subprocess.Popen, ready_url: str, started: float, timeout: float, log_path: Path | None
) -> None:
    args = list(proc.args)
    name = args[2] if len(args) > 2 and args[1] == "-m" else str(args[0])  # (python -m NAME ...)
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{name} exited with code {proc.returncode} before it was ready; log {log_path}:\n"
                f"{log_tail(log_path)}"
            )
        try:
            if httpx.get(ready_url, timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() - started > timeout:
            raise ServerStartError(
                f"{name} not ready after {timeout:.0f} s; log {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group of ``proc`` (uvicorn then shuts the engine down), SIGKILL whatever is left
    after ``grace`` seconds (engine processes may outlive the server process itself)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@contextmanager
def local_server(
    model: str | Path,
    port: int | None = None,
    log_path: str | Path | None = None,
    enforce_eager: bool = True,
    extra_args: list[str] | tuple[str, ...] = (),
    startup_timeout: float = 600.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``python -m generator_server --model MODEL`` on ``127.0.0.1:PORT``; yields its URL once healthy.

    ``enforce_eager`` skips vLLM's torch.compile warm-up (about 40 s on a CPU), which pays off for short
    runs. The server log goes to ``log_path`` (default: discarded); ``extra_env`` is added to its environment
    (e.g. ``CUDA_VISIBLE_DEVICES`` to give it a GPU of its own). The model is served in float32 so its
    greedy outputs and log-probabilities match the trainer's fp32 copy.
    """
    port = port or free_port()
    args = ["--port", str(port), "--dtype", "float32", "--log-level", "warning", *extra_args]
    if enforce_eager:
        args.append("--enforce-eager")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU; the demo's model needs little
    env.update(extra_env or {})
    url = f"http://127.0.0.1:{port}"
    with launched(server_command(model, *args), url, env, log_path, startup_timeout) as server:
        yield server.url
