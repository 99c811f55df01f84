"""The server's code inside vLLM's engine processes (generator_server/engine_plugin.py): on the CPU they poll
for each other's steps with pauses instead of spinning on a core that the worker or a trainer beside the
server needs (docs/SERVER.md: what that is worth to the CPU demo, measured with bench/demo_real.py)."""

from __future__ import annotations

import threading
import time
from importlib.metadata import entry_points

import psutil
import pytest
import zmq

from generator_server.engine_plugin import POLLS_WITH_PAUSES, poll_with_pauses


@pytest.fixture
def spin_condition():
    """vLLM's SpinCondition class, restored after the test."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    original = SpinCondition.wait
    yield SpinCondition
    SpinCondition.wait = original


def test_a_reader_in_the_busy_window_pauses_between_polls_and_still_wakes_when_told(spin_condition, tmp_path):
    context = zmq.Context()
    address = f"ipc://{tmp_path}/notify"
    writer = spin_condition(is_reader=False, context=context, notify_address=address)
    reader = spin_condition(is_reader=True, context=context, notify_address=address)  # made before the patch
    try:
        assert poll_with_pauses(0.2)
        assert poll_with_pauses(0.2)  # twice: still one wrapper around vLLM's own wait
        assert spin_condition.wait.__wrapped_wait__.__qualname__ == "SpinCondition.wait"

        # just after a read vLLM's reader would yield the core and return at once: this one sleeps first
        reader.record_read()
        started = time.monotonic()
        reader.wait(timeout_ms=None)
        assert time.monotonic() - started >= 0.19

        # past the busy window it is vLLM's wait on the socket: until its timeout with nothing announced ...
        reader.last_read = time.monotonic() - 10 * reader.busy_loop_s
        started = time.monotonic()
        reader.wait(timeout_ms=1000)
        assert time.monotonic() - started >= 0.9  # (not the 0.2 s pause)

        # ... and until a writer's announcement
        woken = threading.Event()

        def announce() -> None:
            while not woken.is_set():  # (until the subscription has reached the writer, announcements drop)
                writer.notify()
                time.sleep(0.01)

        announcer = threading.Thread(target=announce)
        announcer.start()
        try:
            reader.wait(timeout_ms=None)  # no timeout: only an announcement returns it
        finally:
            woken.set()
            announcer.join()
    finally:
        for socket in (writer.local_notify_socket, reader.local_notify_socket):
            socket.close(linger=0)
        reader.read_cancel_socket.close(linger=0)
        reader.write_cancel_socket.close(linger=0)
        context.term()


def test_the_cpu_servers_engine_processes_poll_with_pauses(server):
    plugins = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "generator_server.engine_plugin:setup" in plugins  # vLLM loads it in each engine process
    engine = [
        p.pid
        for p in psutil.Process(server.proc.pid).children(recursive=True)
        if p.name().startswith("VLLM::")
    ]
    assert len(engine) >= 2, "expected the engine core and its worker under the server"
    said = [line for line in server.log_path.read_text().splitlines() if POLLS_WITH_PAUSES in line]
    for pid in engine:  # each one replaced vLLM's spinning wait, once
        assert len([line for line in said if f"pid {pid};" in line]) == 1, (pid, said)
