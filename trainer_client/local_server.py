"""Start a generation server as a child process for the length of a ``with`` block.

    with local_server("models/starter", log_path="runs/demo/server.log") as url:
        ...  # talk to the server at url

Used by ``trainer-client demo`` and by ``trainer-client eval`` when no ``--server-url`` is given. The
server runs in its own process group, so stopping it also stops the vLLM engine processes it spawned.
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
from pathlib import Path

from trainer_client.client import GeneratorClient, GeneratorUnavailable


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


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


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
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "generator_server", "--model", str(model), "--port", str(port)]
    cmd += ["--dtype", "float32", "--log-level", "warning", *extra_args]
    if enforce_eager:
        cmd.append("--enforce-eager")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU; the demo's model needs little
    env.update(extra_env or {})
    log_path = Path(log_path) if log_path is not None else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(proc, url, startup_timeout, log_path)
        yield url
    finally:
        _stop(proc)
        if log_path is not None:
            log_file.close()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout
    with GeneratorClient(url, timeout=10.0, max_retries=0) as client:
        while True:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"generation server exited with code {proc.returncode} during start-up\n{_tail(log_path)}"
                )
            try:
                client.health(retries=0)
                return
            except GeneratorUnavailable:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"generation server not healthy after {timeout:.0f} s\n{_tail(log_path)}"
                )
            time.sleep(1.0)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after ``grace`` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # engine processes may outlive the server process itself
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
