"""Run a real generation server (``python -m generator_server``) as a child process for tests.

    with running_server(model_dir, "--api-key", "secret") as server:
        httpx.get(f"{server.url}/health")

The server starts with ``--enforce-eager --dtype float32`` (fast start; logprobs comparable with an fp32
transformers model) and ``VLLM_CPU_KVCACHE_SPACE=1``; flags given later override these. It is started and
stopped by the project's one launcher (``trainer_client.local_server.launched``): in its own process group,
so stopping it also stops the vLLM engine processes it started.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from trainer_client.local_server import (  # noqa: F401  (free_port, stop_process_group: for the tests)
    free_port,
    launched,
    log_tail,
    server_command,
    stop_process_group,
)

DEFAULT_ARGS = ("--enforce-eager", "--dtype", "float32")
START_TIMEOUT_S = 720.0


@dataclass
class ServerHandle:
    url: str
    api_key: str | None
    proc: subprocess.Popen
    log_path: Path
    start_seconds: float
    """Seconds from launch until /health answered 200."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """An httpx client for this server, sending the API key."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def weights_version(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=10.0).json()["weights_version"]

    def push(self, path: str | Path, version: int, **headers: str) -> httpx.Response:
        """``PUT /weights?version=V`` with the bytes of ``path``; header names: ``_`` becomes ``-``."""
        extra = {k.replace("_", "-"): v for k, v in headers.items()}
        with self.client() as client:
            return client.put(
                "/weights", params={"version": version}, content=Path(path).read_bytes(), headers=extra
            )

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def _flag_value(args: tuple[str, ...], flag: str) -> str | None:
    """The last value given for ``flag`` as ``--flag V`` or ``--flag=V``."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


@contextmanager
def running_server(
    model_dir: str | Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT_S,
    port: int | None = None,
) -> Iterator[ServerHandle]:
    """Start a server on ``port`` (default: a free one), wait for ``/health`` 200, yield its handle, stop it
    on exit.

    ``env`` adds to (and overrides) this process's environment. Fails fast, with the end of the server
    log, if the process exits before it is healthy."""
    port = port or free_port()
    args = (*DEFAULT_ARGS, "--host", "127.0.0.1", *extra_args, "--port", str(port))
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    api_key = _flag_value(args, "--api-key") or full_env.get("GENERATOR_API_KEY")
    log_path = Path(tempfile.mkdtemp(prefix="generator-server-log-")) / "server.log"
    url = f"http://127.0.0.1:{port}"
    with launched(server_command(model_dir, *args), url, full_env, log_path, timeout) as server:
        yield ServerHandle(url, api_key, server.proc, log_path, server.start_seconds)
