"""Why an engine died, in words a user can act on: the signal that killed its process (SIGKILL from the
kernel's out-of-memory killer, say) or the exception it raised.

vLLM runs the engine core in a process of its own; when that process dies, the server's side sees only
``EngineDeadError`` ("see stack trace above"). Two things name the cause:

* the engine processes' exit status, which vLLM's process manager holds (a negative status is the signal),
  and the kernel's count of out-of-memory kills (``/proc/vmstat``), read before and after;
* what the engine's processes log at ERROR level: :func:`record_fatal_errors`, installed there by this
  package's vLLM plugin (generator_server/engine_plugin.py), appends those records ("EngineCore
  encountered a fatal error" and its exception, "Worker proc ... died unexpectedly (exit code: -9)") to a
  file the server names in ``$ONLINE_DPO_ENGINE_ERROR_FILE``.
  On the CPU the model runs in a worker process below the engine core, whose exit status only the engine
  core sees: this is how a SIGKILL of that worker (the process the out-of-memory killer picks: it holds
  the weights and the KV cache) reaches the server.

This module imports neither torch nor vLLM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

ERROR_FILE_ENV = "ONLINE_DPO_ENGINE_ERROR_FILE"
"""Where the engine's process writes the exception it died of (set by the server before the engine
starts; spawned engine processes inherit it)."""
SERVER_PID_ENV = "ONLINE_DPO_ENGINE_SERVER_PID"
"""The server's own process, whose vLLM errors (``EngineDeadError`` once the engine is gone) are not the
engine's cause of death and are not recorded."""
MAX_MESSAGE_CHARS = 300
MAX_RECORDS = 20
"""ERROR records one engine process writes at most (the first ones: the cause comes before its echoes)."""
MAX_PARTS = 3
WORKER_DIED = re.compile(r"Worker proc (?P<name>\S+) died unexpectedly \(exit code: (?P<code>-?\d+|None)\)")
"""How vLLM's engine core reports a worker process found dead (vllm/v1/executor/multiproc_executor.py).
Its code is ``None`` when the worker's pipe closed before the kernel made its exit status readable (the
two are apart on a loaded machine): :func:`_settle_exit_code` then reads it in the engine core."""
SETTLE_SECONDS = 5.0
"""Longest the engine core's recorder waits for a dead worker's exit status to become readable."""


def oom_kills() -> int | None:
    """The kernel's count of processes its out-of-memory killer has killed since boot (None: unknown)."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _engine_processes(llm) -> list:
    """vLLM's engine-core processes of ``llm`` (an ``AsyncLLM``; its process manager's ``processes``), or
    none where this vLLM keeps them elsewhere."""
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return list(getattr(manager, "processes", None) or [])


def describe_exit(name: str, pid: int | None, code: int | None, oom_killed: bool) -> str:
    """``code`` as multiprocessing reports it: negative for the signal that ended the process (None: not
    known)."""
    who = f"the engine process {name}" + (f" (pid {pid})" if pid else "")
    if code is None:
        return f"{who} died (its exit status could not be read)"
    if code >= 0:
        return f"{who} exited with status {code}"
    try:
        sig = signal.Signals(-code).name
    except ValueError:
        sig = f"signal {-code}"
    if sig != "SIGKILL":
        return f"{who} was killed by {sig}"
    if oom_killed:
        return f"{who} was killed by SIGKILL from the kernel's out-of-memory killer (memory ran out)"
    return (
        f"{who} was killed by SIGKILL (sent by the kernel's out-of-memory killer when memory runs out, or "
        "by a person or an orchestrator)"
    )


class DeathWatch:
    """One engine's cause of death: create it before the engine starts, ask :meth:`cause` once it died."""

    def __init__(self, error_file: Path):
        self.error_file = error_file
        self.error_file.unlink(missing_ok=True)
        os.environ[ERROR_FILE_ENV] = str(error_file)
        os.environ[SERVER_PID_ENV] = str(os.getpid())
        self.oom_kills_before = oom_kills()

    def cause(self, llm, wait: float = 3.0) -> str:
        """What killed ``llm``'s engine, waiting up to ``wait`` seconds for its processes' exit status."""
        deadline = time.monotonic() + wait
        processes = _engine_processes(llm)
        while any(p.exitcode is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        after = oom_kills()
        oom_killed = None not in (after, self.oom_kills_before) and after > self.oom_kills_before
        # A signal explains everything after it (the engine core's own error once its worker is gone, its
        # exit status 1); without one, the first exception is the cause and the rest its echoes.
        records = self.reported()
        # "cancelled" is the echo of an executor shut down by its worker monitor, which logs the worker it
        # found dead: wait for that line a little longer (on a loaded machine it can come late)
        while (
            any("cancelled" in (r.get("error") or "") for r in records)
            and not any(WORKER_DIED.search(r["message"]) for r in records)
            and time.monotonic() < deadline + wait
        ):
            time.sleep(0.1)
            records = self.reported()
        killed = [
            describe_exit(died["name"], None, _exit_code(died["code"]), oom_killed)
            for died in (WORKER_DIED.search(r["message"]) for r in records)
            if died
        ]
        killed += [
            describe_exit(p.name, p.pid, p.exitcode, oom_killed) for p in processes if (p.exitcode or 0) < 0
        ]
        if killed:
            parts = killed
        else:
            raised = [f"it raised {r['error']}" for r in records if r.get("error")][:1]
            ended = [describe_exit(p.name, p.pid, p.exitcode, False) for p in processes if p.exitcode]
            parts = ended + raised
        parts = list(dict.fromkeys(parts))[:MAX_PARTS]
        if not parts:
            return "the engine stopped (vLLM's EngineDeadError) without an exit status or exception to show"
        return "; ".join(parts)

    def reported(self) -> list[dict]:
        """What the engine's processes logged at ERROR level, oldest first."""
        try:
            lines = self.error_file.read_text().splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


def _exit_code(text: str) -> int | None:
    return None if text == "None" else int(text)


def _settle_exit_code(message: str) -> str:
    """``message`` with a dead worker's exit code filled in where vLLM's monitor logged it as ``None``.

    The monitor wakes when the worker's end of a pipe closes, which the kernel does while the process is
    still exiting; its exit status (the signal) is readable a moment later. This runs in the engine core,
    the worker's parent, which can wait for it: its ``multiprocessing`` keeps the started processes."""
    died = WORKER_DIED.search(message)
    if not died or died["code"] != "None":
        return message
    for process in list(getattr(multiprocessing.process, "_children", ())):
        if process.name == died["name"]:
            with contextlib.suppress(Exception):
                process.join(SETTLE_SECONDS)
                if process.exitcode is not None:
                    return message.replace("(exit code: None)", f"(exit code: {process.exitcode})", 1)
    return message


class _ErrorRecords(logging.Handler):
    """Appends vLLM's ERROR records (the message, and the exception if any, one JSON line each, at most
    ``MAX_RECORDS``) to ``path``."""

    def __init__(self, path: str):
        super().__init__(logging.ERROR)
        self.path = path
        self.written = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.written >= MAX_RECORDS:
            return
        error = record.exc_info[1] if record.exc_info else None
        text = None
        if error is not None:
            first_line = (str(error).strip().splitlines() or [""])[0]
            text = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
        try:
            message = _settle_exit_code(record.getMessage())
        except Exception:
            message = str(record.msg)
        line = {"message": message[:MAX_MESSAGE_CHARS], "error": text and text[:MAX_MESSAGE_CHARS]}
        try:  # one write of one line in append mode: lines of several processes do not interleave
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
            self.written += 1
        except OSError:
            pass  # (nothing to do about it in a dying process)


def record_fatal_errors() -> None:
    """In an engine process (not the server's): append what vLLM logs at ERROR level (the exception it
    dies of, a worker found dead and its exit code) to ``$ONLINE_DPO_ENGINE_ERROR_FILE``, if set. Called by
    this package's vLLM plugin (:func:`generator_server.engine_plugin.setup`, loaded in the engine-core and
    worker processes once vLLM's logging is set up, and again where the worker extension is imported);
    installing twice is a no-op."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path or os.environ.get(SERVER_PID_ENV) == str(os.getpid()):
        return
    vllm_log = logging.getLogger("vllm")
    if not any(isinstance(h, _ErrorRecords) for h in vllm_log.handlers):
        vllm_log.addHandler(_ErrorRecords(path))
