"""The training loop's two background threads: the producer of batches and the pusher of weights.

    producer (generate batch s, after the push it needs)  -> queue ->  training thread (train.py)
    training thread (snapshot of version s)  -> pusher (push in order, by the backend's weight transport)

Both run on rank 0 only (or in the only process); they hand their errors to the training thread, which
raises them at its next ``Producer.get`` or ``Pusher.submit``.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from trainer_client.config import TrainConfig
from trainer_client.generation import GenerationBackend, GenerationBatch

log = logging.getLogger("trainer_client")


def generation_seed(seed: int, step: int) -> int:
    """The sampling seed of step ``step``: a pure function of ``(seed, step)``, so a resumed run resamples
    exactly what the uninterrupted run sampled."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Batch:
    step: int
    policy_version: int  # the policy version that sampled it
    samples: GenerationBatch
    gen_start: float  # time.monotonic() interval of the generate request
    gen_end: float
    prepared: Any = None  # what the producer's `prepare` made of the samples (scores, pairs, ...)


class Pusher:
    """Pushes weight snapshots in order from a background thread; wakes whoever waits for a version.

    ``submit`` returns at once unless ``max_pending`` snapshots already wait (then training waits, so memory
    stays bounded). Each push sets ``push_seconds`` in the metrics record submitted with it."""

    def __init__(self, backend: GenerationBackend, offset: int, served: int, max_pending: int = 2):
        self.backend, self.offset = backend, offset
        self.served = served  # highest policy version known to be served
        self.server_version = served + offset  # the server version we last put there
        self.latest: tuple[int, dict] | None = None  # (policy version, snapshot) last pushed
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.push_lock = threading.Lock()  # one PUT at a time (normal pushes and re-pushes)
        self.todo: queue.Queue = queue.Queue(maxsize=max_pending)
        self.thread = threading.Thread(target=self._run, name="pusher", daemon=True)
        self.thread.start()

    def push_now(self, version: int, snapshot: dict, record: dict | None = None) -> None:
        """Push ``snapshot`` as policy ``version`` from the calling thread (``record["push_seconds"]`` and
        ``record["push_bytes"]`` are set before anyone learns that the version is served)."""
        t0 = time.monotonic()
        with self.push_lock:
            answer = self.backend.push(snapshot, version + self.offset)
            self.latest = (version, snapshot)
            self.server_version = version + self.offset
        if record is not None:
            record["push_seconds"] = round(time.monotonic() - t0, 4)
            record["push_bytes"] = pushed_bytes(answer)
            record["push_pause_seconds"] = pushed_pause(answer)
            record["push_wait_seconds"] = pushed_wait(answer)
        with self.cond:
            self.served = max(self.served, version)
            self.cond.notify_all()

    def repush_latest(self) -> None:
        """After a server restart: put the last pushed weights back (a restarted server serves version 0)."""
        with self.push_lock:
            if self.latest is not None:
                version, snapshot = self.latest
                self.backend.push(snapshot, version + self.offset)

    def submit(self, version: int, snapshot: dict, record: dict) -> None:
        self._put((version, snapshot, record))

    def wait_served(self, version: int, stop: threading.Event | None = None) -> bool:
        """Block until policy ``version`` is served; False if ``stop`` was set first."""
        with self.cond:
            while self.served < version:
                self.raise_if_failed()
                if stop is not None and stop.is_set():
                    return False
                self.cond.wait(0.5)
        return True

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait until every submitted snapshot is pushed."""
        self._put(None)
        self.thread.join()
        self.raise_if_failed()

    def abort(self) -> None:
        """Let the thread end after its current push (whatever else is queued is dropped)."""
        while True:
            try:
                self.todo.get_nowait()
            except queue.Empty:
                break
        self.todo.put_nowait(None)

    def _put(self, item) -> None:
        while True:
            self.raise_if_failed()
            try:
                return self.todo.put(item, timeout=0.5)
            except queue.Full:
                continue

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            try:
                self.push_now(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return


def pushed_bytes(answer) -> int | None:
    """The bytes of one copy of a pushed version, from the backend's answer (several replicas: the largest
    any one of them received); None where the backend does not say."""
    if not isinstance(answer, dict):
        return None
    if answer.get("bytes") is not None:
        return int(answer["bytes"])
    each = [r.get("bytes") for r in (answer.get("replicas") or {}).values() if isinstance(r, dict)]
    each = [b for b in each if b is not None]
    return max(each) if each else None


def pushed_pause(answer) -> float | None:
    """The seconds a push held generation stopped (the server's swap, its ``load_seconds``; several
    replicas: the longest), from the backend's answer; None where the backend does not say."""
    return _longest_seconds(answer, "load_seconds")


def pushed_wait(answer) -> float | None:
    """The seconds a push waited for running generation before its swap (the server's ``wait_seconds``;
    several replicas: the longest); None where the backend does not say."""
    return _longest_seconds(answer, "wait_seconds")


def _longest_seconds(answer, key: str) -> float | None:
    if not isinstance(answer, dict):
        return None
    if answer.get(key) is not None:
        return round(float(answer[key]), 4)
    each = [r.get(key) for r in (answer.get("replicas") or {}).values() if isinstance(r, dict)]
    each = [s for s in each if s is not None]
    return round(max(each), 4) if each else None


class Producer:
    """Generates the batches of steps ``first..last`` in order, each after the push it needs is served, and
    hands each to ``prepare`` (the loop's work on a batch that needs no policy: scores, pairs, the
    reference's log-probabilities) before queueing it, so that runs behind the previous step too."""

    def __init__(
        self, config: TrainConfig, task, backend, pusher: Pusher, first: int, last: int, sampling,
        prepare: Callable[[GenerationBatch], Any] | None = None,
    ):  # fmt: skip
        self.config, self.task, self.sampling, self.prepare = config, task, sampling, prepare
        self.backend, self.pusher = backend, pusher
        self.steps = range(first, last + 1)
        self.batches: queue.Queue[Batch] = queue.Queue()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.working = threading.Lock()  # held while a batch is generated and prepared (see `paused`)
        self.thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for step in self.steps:
                # bounded staleness: batch s may come from version s-1-max_staleness at the oldest
                oldest = max(0, step - 1 - self.config.max_staleness)
                if not self.pusher.wait_served(oldest, self.stop):
                    return
                with self.working:
                    batch = self._generate(step, oldest)
                    if self.prepare is not None:
                        batch.prepared = self.prepare(batch.samples)
                self.batches.put(batch)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self.error = e

    def _generate(self, step: int, oldest: int) -> Batch:
        c = self.config
        prompts = self.task.train_prompts(step, c.batch_size, c.seed)
        while True:
            t0 = time.monotonic()
            samples = self.backend.generate(
                prompts, n=c.samples_per_prompt, seed=generation_seed(c.seed, step), **self.sampling
            )
            t1 = time.monotonic()
            pushed = self.pusher.server_version
            if samples.weights_version < pushed and self.backend.version() < pushed:
                # The server went back to an older version: it restarted. Put our weights back, resample.
                log.warning(
                    "server restarted (version %d < %d); pushing weights again",
                    samples.weights_version,
                    pushed,
                )
                self.pusher.repush_latest()
                continue
            version = samples.weights_version - self.pusher.offset
            if version < oldest:
                raise RuntimeError(
                    f"server answered with version {samples.weights_version}, older than allowed"
                )
            return Batch(step, version, samples, t0, t1)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No batch is generated or prepared inside this block (one under way finishes first): the loop's
        held-out evaluation then has the backend to itself, and its time is not hidden generation."""
        with self.working:
            yield

    def get(self, pusher: Pusher) -> Batch:
        while True:
            if self.error is not None:
                raise self.error
            pusher.raise_if_failed()
            try:
                return self.batches.get(timeout=0.5)
            except queue.Empty:
                continue
