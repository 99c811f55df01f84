"""What this package does inside vLLM's own engine processes (the engine core, and on the CPU its worker).

vLLM loads :func:`setup` in each of them as a plugin (``vllm.general_plugins`` in pyproject.toml), once
its logging is set up; the server passes its settings down in environment variables, which the spawned
processes inherit. Outside a generator-server's engine (no such variable set) it does nothing. Two jobs:

* record what an engine process dies of (:func:`generator_server.engine_deaths.record_fatal_errors`);
* on the CPU, let the engine's processes poll for each other's steps with short pauses instead of spinning
  (:func:`poll_with_pauses`).

**Why not spin on the CPU.** The engine core hands each step to the worker through a shared-memory queue,
and each side waits for the other's next message by polling the queue in a loop (``sched_yield`` between
polls) for up to a second after the last message, before it sleeps on a notification socket. On a GPU a
step takes milliseconds and the loop saves a wake-up each. On the CPU a step takes a tenth of a second or
more, so the engine core polls through the whole generation, on a core the worker or a trainer beside the
server needs. Sleeping a millisecond between polls keeps vLLM's protocol as it is (the queue is still
polled, the socket used only where vLLM uses it) and adds at most a millisecond to a step's hand-over;
it took the CPU demo from 412-416 s to 356 s, the same run otherwise (docs/SERVER.md).
(Leaving the loop out altogether, so that each wait sleeps on the socket, lost wake-ups: a weight reload
that takes 1.2 s stalled for 5 or 10 s more, on most pushes of the CPU demo.)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

from generator_server.engine_deaths import SERVER_PID_ENV, record_fatal_errors

POLL_ENV = "ONLINE_DPO_ENGINE_POLL_PAUSE"
"""Seconds an engine process sleeps between two polls of vLLM's shared-memory queue while it waits for the
next message; unset or 0: vLLM's own spin (``sched_yield``). The server sets it on the CPU
(:data:`CPU_POLL_PAUSE`) unless it is set already, so a user can still choose."""
CPU_POLL_PAUSE = 0.001


POLLS_WITH_PAUSES = "generator-server: this engine process polls for the next step with pauses, not spinning"
"""Logged (vLLM's log, so the server's) by each engine process where the spinning wait is replaced."""
_announced = False
"""Whether this process has logged it (``setup`` runs twice in a worker: as the plugin and on import of
the worker extension)."""


def setup() -> None:
    """The vLLM plugin: install both in this engine process (a no-op outside a generator-server's engine;
    calling it again changes nothing)."""
    record_fatal_errors()
    try:
        pause = float(os.environ.get(POLL_ENV) or 0)
    except ValueError:  # (a user's typo must not stop the engine: vLLM's own loop, and say so)
        logging.getLogger("vllm.online_dpo").warning("%s is not a number of seconds: ignored", POLL_ENV)
        return
    if pause <= 0 or os.environ.get(SERVER_PID_ENV) == str(os.getpid()):
        return  # (not asked, or the server's own process, which has no such queue to wait on)
    global _announced
    if poll_with_pauses(pause) and not _announced:
        _announced = True
        logging.getLogger("vllm.online_dpo").info(
            "%s (%s, pid %d; %s=%s)", POLLS_WITH_PAUSES, multiprocessing.current_process().name, os.getpid(),
            POLL_ENV, pause,
        )  # fmt: skip


def poll_with_pauses(pause: float) -> bool:
    """Readers of vLLM's shared-memory message queue (its ``SpinCondition``) sleep ``pause`` seconds between
    two polls of the queue, where vLLM yields the core and polls again at once; after vLLM's busy window
    (a second without a message) they wait on the notification socket as vLLM does. Patches the class, so
    queues created before the call are covered too. False where this vLLM has no such class or fields
    (nothing changed)."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        return False
    original = getattr(SpinCondition, "wait", None)
    if original is None:
        return False
    original = getattr(original, "__wrapped_wait__", original)

    def wait(self, timeout_ms: int | None = None) -> None:
        last_read, window = getattr(self, "last_read", None), getattr(self, "busy_loop_s", None)
        if getattr(self, "is_reader", False) and last_read is not None and window is not None:
            if time.monotonic() <= last_read + window:  # (vLLM's busy window: it would sched_yield here)
                time.sleep(pause)
                return None
        return original(self, timeout_ms)

    wait.__wrapped_wait__ = original
    SpinCondition.wait = wait
    return True
