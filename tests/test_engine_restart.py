"""An engine that dies says why and is replaced: the real server, the real CPU engine, a real SIGKILL.

The kernel's out-of-memory killer picks the process holding the weights and the KV cache: on the CPU that
is vLLM's worker process, below the engine core, below the server. The test kills it the same way, then
checks that the request running at the time, ``/health``, the server's log and the trainer's client all
name the signal, and that a new engine serves. Its own server: killing the shared one's engine would
disturb the other tests. Started without transport flags, it also shows the stream port on by default.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from server_process import running_server

from generator_server.engine_deaths import (
    ERROR_FILE_ENV,
    SERVER_PID_ENV,
    DeathWatch,
    describe_exit,
    record_fatal_errors,
)
from online_dpo_protocol import PushTarget
from trainer_client.client import GeneratorClient, GeneratorUnavailable
from trainer_client.transports import choose_transport

API_KEY = "restart-key"
RESTART_TIMEOUT_S = 600.0


def engine_worker(server_pid: int) -> psutil.Process:
    """vLLM's worker process (the model) among the server's descendants."""
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "VLLM::Worker" in " ".join(child.cmdline()) or child.name().startswith("VLLM::Worker"):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no VLLM::Worker below the server: {psutil.Process(server_pid).children(True)}")


def test_a_killed_engine_says_why_and_a_new_one_serves(tiny_model_dir, make_weights):
    with running_server(tiny_model_dir, "--api-key", API_KEY, "--max-model-len", "256") as server:
        health = httpx.get(f"{server.url}/health", timeout=30).json()
        assert health["engine_restarts"] == 0 and health["last_engine_error"] is None, health
        # started without transport flags: its stream port is on, and push: auto takes it
        with server.client() as client:
            spec = client.get("/weights").json()
        assert "stream" in spec["transports"] and spec["stream_port"] > 0, spec
        assert choose_transport("auto", PushTarget.model_validate(spec), "cpu") == "stream"
        assert server.push(make_weights(seed=7), 1).status_code == 200

        # A request that cannot end before the kill: it runs until the engine dies under it.
        answers: list[httpx.Response] = []
        long_request = {"prompts": ["The cat"] * 64, "max_tokens": 250, "ignore_eos": True, "n": 64}

        def generate() -> None:
            with server.client(timeout=600) as client:
                answers.append(client.post("/generate", json=long_request))

        requester = threading.Thread(target=generate)
        requester.start()
        deadline = time.monotonic() + 120
        with server.client() as client:
            while "generator_generate_requests_running 1.0" not in client.get("/metrics").text:
                assert not answers, f"the long request ended before it was seen running: {answers}"
                assert time.monotonic() < deadline, "the long request was never seen running"
                time.sleep(0.05)
        engine_worker(server.proc.pid).send_signal(signal.SIGKILL)
        requester.join(timeout=120)

        # The request the engine died under: 503 (retry), naming the signal.
        assert answers and answers[0].status_code == 503, answers and answers[0].text
        assert "SIGKILL" in answers[0].json()["detail"], answers[0].text

        # While the new engine starts, /health and the trainer's client say what killed the old one.
        # (a new engine takes many seconds to start: spawning its processes and importing vLLM alone do)
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503, health.text
        body = health.json()
        assert body["status"] == "starting" and "SIGKILL" in body["detail"], body
        # (engine_restarts counts engines started after a death: 0 or already 1 while the new one starts)
        assert "SIGKILL" in body["last_engine_error"] and body["engine_restarts"] in (0, 1), body
        with GeneratorClient(server.url, api_key=API_KEY, max_retries=0) as trainer_side:
            with pytest.raises(GeneratorUnavailable, match="SIGKILL"):
                trainer_side.generate(prompts=["Hi"], max_tokens=2)

        # Then the new engine serves, from the model folder (version 0), and /health remembers the death.
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while (health := httpx.get(f"{server.url}/health", timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, (
                f"no new engine after {RESTART_TIMEOUT_S:.0f} s: {health.text}"
            )
            assert server.proc.poll() is None, server.log_tail()
            time.sleep(0.5)
        body = health.json()
        assert body["engine_restarts"] == 1 and body["weights_version"] == 0, body
        assert "VllmWorker" in body["last_engine_error"] and "SIGKILL" in body["last_engine_error"], body
        with server.client() as client:
            answer = client.post("/generate", json={"prompts": ["Hi"], "max_tokens": 4})
            assert answer.status_code == 200 and answer.json()["weights_version"] == 0, answer.text
            assert client.get("/weights").json()["stream_port"] == spec["stream_port"]  # (the same port)
        assert server.push(make_weights(seed=8), 1).status_code == 200  # pushes land as on a fresh server
        log = server.log_path.read_text(errors="replace")
        assert "the engine died" in log and "SIGKILL" in log, server.log_tail()


def test_the_cause_of_death_in_words(tmp_path, monkeypatch):
    """What the server says for each way an engine process can end (no engine: its parts, exit statuses
    and logged records as vLLM gives them)."""
    assert "SIGKILL" in describe_exit("EngineCore_DP0", 42, -9, oom_killed=False)
    assert "out-of-memory killer (memory ran out)" in describe_exit("VllmWorker-0", None, -9, oom_killed=True)
    assert describe_exit("EngineCore_DP0", 42, -15, oom_killed=False).endswith("killed by SIGTERM")
    assert describe_exit("EngineCore_DP0", 42, 1, oom_killed=False).endswith("exited with status 1")

    # the records an engine process logs, as the plugin writes them (here in a process of its own, as the
    # engine's would be: the server's own process never records)
    monkeypatch.setenv(ERROR_FILE_ENV, "")  # (restored after the test: DeathWatch sets both)
    monkeypatch.setenv(SERVER_PID_ENV, "")

    def died_of(tmp: Path, *records: tuple[str, str, str | None], exitcode: int = 1) -> str:
        watch = DeathWatch(tmp)
        child = multiprocessing.get_context("spawn").Process(target=_log_as_an_engine, args=(records,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        record_fatal_errors()  # in the server's process: nothing is recorded
        logging.getLogger("vllm.v1.engine.core").error("not the engine's")
        assert "not the engine's" not in "".join(str(r) for r in watch.reported())
        return watch.cause(_DeadEngine(exitcode), wait=0)

    # a worker killed: the signal, not its echoes (the engine core's error, its exit status 1)
    cause = died_of(tmp_path / "killed.jsonl", WORKER_KILLED, ENGINE_CORE_FAILED)
    assert cause.startswith("the engine process VllmWorker-0 was killed by SIGKILL"), cause
    assert "raised" not in cause and "status 1" not in cause, cause
    # an exception: the first one raised (the cause), and how the engine core ended
    cause = died_of(tmp_path / "raised.jsonl", SEEDED_PREFILL, ENGINE_CORE_FAILED)
    assert cause == (
        "the engine process EngineCore_DP0 (pid 42) exited with status 1; "
        "it raised RuntimeError: CPU Generator does not use offset"
    ), cause
    # the engine core itself killed: its own exit status says so
    cause = died_of(tmp_path / "core.jsonl", exitcode=-9)
    assert cause.startswith("the engine process EngineCore_DP0 (pid 42) was killed by SIGKILL"), cause


def test_a_worker_whose_exit_status_is_not_yet_readable_is_still_named_with_its_signal(tmp_path, monkeypatch):
    """vLLM's monitor wakes when a dead worker's pipe closes and may log its exit code as ``None`` (the
    kernel makes the status readable a moment later, a moment that is long on a loaded machine). The
    engine core's recorder waits for the status: the cause names the signal, not the echo ("cancelled")."""
    monkeypatch.setenv(ERROR_FILE_ENV, "")
    monkeypatch.setenv(SERVER_PID_ENV, "")
    watch = DeathWatch(tmp_path / "unsettled.jsonl")
    engine_core = multiprocessing.get_context("spawn").Process(target=_kill_a_worker_and_log_at_once)
    engine_core.start()
    engine_core.join(60)
    assert engine_core.exitcode == 0
    messages = [r["message"] for r in watch.reported()]
    assert messages[0].startswith("Worker proc VllmWorker-0 died unexpectedly (exit code: -9)"), messages
    cause = watch.cause(_DeadEngine(1), wait=0)
    assert cause.startswith("the engine process VllmWorker-0 was killed by SIGKILL"), cause


WORKER_KILLED = (
    "vllm.v1.executor.multiproc_executor",
    "Worker proc VllmWorker-0 died unexpectedly (exit code: -9)",
    None,
)
SEEDED_PREFILL = ("vllm.v1.worker", "WorkerProc hit an exception.", "CPU Generator does not use offset\nmore")
ENGINE_CORE_FAILED = ("vllm.v1.engine.core", "EngineCore encountered a fatal error.", "cancelled")


class _DeadEngine:
    """The parts of vLLM's ``AsyncLLM`` a DeathWatch reads: its engine-core processes' exit status."""

    def __init__(self, exitcode: int):
        process = type("Process", (), {"name": "EngineCore_DP0", "pid": 42, "exitcode": exitcode})()
        manager = type("Manager", (), {"processes": [process]})()
        self.engine_core = type("Client", (), {"resources": type("R", (), {"engine_manager": manager})()})()


def _kill_a_worker_and_log_at_once() -> None:
    """As an engine core whose worker was killed, logging before the worker's exit status is readable."""
    import logging
    import os
    import signal

    record_fatal_errors()
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,), name="VllmWorker-0")
    worker.start()
    os.kill(worker.pid, signal.SIGKILL)
    logging.getLogger("vllm.v1.executor.multiproc_executor").error(
        "Worker proc %s died unexpectedly (exit code: %s), shutting down executor.", worker.name, None
    )
    logging.getLogger("vllm.v1.engine.core").exception("EngineCore encountered a fatal error.")


def _log_as_an_engine(records) -> None:
    """In a process of its own, as an engine's: log ``records`` (logger, message, exception or None) as
    vLLM would."""
    import logging

    record_fatal_errors()
    for logger, message, error in records:
        if error is None:
            logging.getLogger(logger).error(message)
            continue
        try:
            raise RuntimeError(error)
        except RuntimeError:
            logging.getLogger(logger).exception(message)
