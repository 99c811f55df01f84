"""Several generation replicas behind one backend: one trainer, N servers serving the same model.

``server_url: [http://a:8000, http://b:8000]`` makes ``make_backend`` (backends.py) build a
:class:`ReplicaSetBackend` over one :class:`~trainer_client.server_backend.ServerBackend` per URL. To the
loop it is one backend (the ``GenerationBackend`` protocol); inside:

* **Split.** A batch is cut into one contiguous block of prompts per live replica, so each replica gets one
  ``POST /generate`` per batch, all sent at once (threads), and the answers are put back in prompt order.
  All ``n`` samples of a prompt are one prompt of one request. Block sizes even out the tokens each replica
  has in flight for this trainer: ``n * max_tokens`` is reserved per prompt from sending until the answer
  (:func:`split_by_load`). With one generate call at a time the replicas start a batch level and get equal
  blocks; what is still in flight matters when prompts of a failed replica are sent to the others while
  they work, or when generate is called from several threads. The servers' own gauge
  (``generator_generate_requests_running``) is not read: it counts requests, not tokens, and one more HTTP
  call per replica per batch would sit on the critical path; this trainer is the replicas' only client.
  Measured throughput is not used either: a replica given fewer prompts batches fewer sequences and looks
  slower, which would starve it further.
* **Seeds.** The server samples prompt ``i`` of a request with ``seed + i``. A block starting at prompt
  ``j`` of the batch is sent with ``seed + j``, so every prompt samples with the seed it has in the whole
  batch, however the batch was split (hence contiguous blocks: a block is one run of seeds).
* **Versions.** All replicas serve the same version numbers: ``weights_spec`` reports the highest version
  any replica serves, so the loop's first push (it pushes when that version is not 0) brings them level;
  fresh replicas all start at 0 and need none. A batch reports the lowest version among the replicas that
  answered it as ``weights_version`` (the staleness bound then holds for every sample), each prompt's
  version in ``prompt_versions`` and per-replica figures in ``replica_stats``.
* **Push.** Every version goes to every live replica at once, each by its own transport. A snapshot
  (:class:`ReplicaSnapshot`) holds one copy of the model per transport kind the replicas use (``http``,
  ``shared``, ``ipc``): one copy when they all use the same kind. The latest pushed snapshot is kept (a
  reference to the one the loop's pusher keeps anyway, not a copy) to bring back a replica that returns.
  A push fails only when no replica took it.
* **Faults.** A replica whose request or push fails after the client's retries, or that answers with a
  version below the one it was given (it restarted), is dropped; its prompts go to the others within the
  same call. A probe thread asks the dropped ones for ``/health`` every ``probe_seconds``; one that answers
  and still serves the same architecture gets the latest weights pushed again and is used only then. With
  no replica left, the call raises :class:`NoReplicaLeftError`, naming each URL and its last error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from trainer_client.client import GeneratorError, GeneratorHTTPError, GeneratorUnavailable
from trainer_client.generation import GenerationBatch, IncompatibleServerError
from trainer_client.server_backend import ServerBackend

log = logging.getLogger(__name__)

SEED_MODULUS = 2**63
"""The server takes ``(seed + i) % 2**63`` as prompt i's seed (generator_server/engine.py)."""
PROBE_SECONDS = 2.0
"""How often a dropped replica is asked whether it is back."""


class NoReplicaLeftError(GeneratorUnavailable):
    """Every generation replica failed; the message names each URL and its last error."""


class ReplicaRestarted(GeneratorError):
    """A replica answered with a version below the one it was given: it restarted, its weights are gone."""


def split_by_load(count: int, loads: Sequence[int], cost: int) -> list[int]:
    """How many of ``count`` prompts each replica gets, given the tokens ``loads[r]`` it has in flight and
    ``cost`` tokens per prompt: one prompt at a time to the replica with the least tokens after it (the
    first such one on a tie), which evens the loads out as far as whole prompts can."""
    counts = [0] * len(loads)
    for _ in range(count):
        r = min(range(len(loads)), key=lambda r: (loads[r] + (counts[r] + 1) * cost, r))
        counts[r] += 1
    return counts


def architecture_difference(
    ours: Mapping[str, tuple[list[int], str]], theirs: Mapping[str, tuple[list[int], str]]
) -> str | None:
    """What differs between two ``{tensor name: (shape, dtype)}`` specs in names or shapes (dtypes may
    differ: a server casts floating point weights); None when nothing does."""
    problems = []
    missing = [n for n in ours if n not in theirs]
    extra = [n for n in theirs if n not in ours]
    shapes = [f"{n}: {list(theirs[n][0])} vs {list(ours[n][0])}" for n in ours if n in theirs and
              list(theirs[n][0]) != list(ours[n][0])]  # fmt: skip
    for label, items in (("missing", missing), ("extra", extra), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(problems) or None


def snapshot_tensors(snapshot: Any) -> dict:
    """The tensors (name -> tensor, in the served dtypes) held by a transport's snapshot."""
    from trainer_client.transports.http import HttpSnapshot

    if isinstance(snapshot, HttpSnapshot):
        return dict(snapshot.body.tensors)
    if isinstance(snapshot, list):  # push: ipc, GPU buckets
        from trainer_client.transports.ipc import bucket_tensors

        return bucket_tensors(snapshot)
    return dict(snapshot)  # push: shared, a dict of host tensors


@dataclass
class ReplicaSnapshot:
    """One version's weights for every replica: one transport snapshot per kind in use (each a copy of the
    model)."""

    by_kind: dict[str, Any]
    adapter: dict | None = None
    """A LoRA adapter's config when the tensors are an adapter's (see ``GenerationBackend.snapshot``)."""


@dataclass(eq=False)
class Replica:
    """One server of the set and what the set knows of it (changed under ``ReplicaSetBackend._state``)."""

    backend: ServerBackend
    live: bool = True
    version: int = 0
    """The version it serves, as far as this trainer knows: at start, then after each push to it."""
    outstanding: int = 0
    """Tokens of this trainer's requests in flight on it (``n * max_tokens`` per prompt)."""
    last_error: str | None = None
    refused: str | None = None
    """Why it may not rejoin (another model, or a version this trainer never pushed); not probed again."""

    @property
    def url(self) -> str:
        return self.backend.client.base_url

    @property
    def kind(self) -> str:
        """Its weight transport (``http``, ``shared``, ``ipc``), chosen by its first ``weights_spec``."""
        return self.backend.transport.name


def _describe(error: BaseException | str) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"


def _timed(call: Callable, *args) -> tuple[float, Any]:
    start = time.monotonic()
    out = call(*args)
    return time.monotonic() - start, out


class ReplicaSetBackend:
    """A ``GenerationBackend`` over several generation servers that serve the same model (see the module
    docstring for the split, the seeds, the versions, the pushes and the faults)."""

    def __init__(self, servers: Sequence[ServerBackend], probe_seconds: float = PROBE_SECONDS):
        urls = [s.client.base_url for s in servers]
        if len(servers) < 2 or len(set(urls)) < len(urls):
            raise ValueError(f"a replica set needs two different servers or more, not {urls}")
        self.replicas = [Replica(s) for s in servers]
        self.probe_seconds = probe_seconds
        self._state = threading.Lock()  # live, version, outstanding, last_error of every replica
        self._pushing = threading.RLock()  # one push or re-admission at a time
        self._shared_file = threading.Lock()  # push: shared writes one file name per version: one at a time
        self._latest: tuple[int, ReplicaSnapshot] | None = None  # (version, snapshot) last pushed
        self._tensors: dict[str, tuple[list[int], str]] = {}  # the first replica's {name: (shape, dtype)}
        self._start_version = 0
        # generate: a request per replica plus re-sends; push: one per replica, at the same time
        self._pool = ThreadPoolExecutor(max_workers=4 * len(servers), thread_name_prefix="replica")
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None

    # --- start: every replica ready, all serving one architecture -----------------------------------------
    def wait_until_ready(self, timeout: float) -> None:
        """Every replica must answer ``/health`` within ``timeout`` (faults are tolerated once running)."""
        _, errors = self._each(self.replicas, lambda r: r.backend.wait_until_ready(timeout))
        if errors:
            raise GeneratorUnavailable(
                "generation replica(s) not ready: " + "; ".join(f"{r.url}: {e}" for r, e in errors.items())
            )

    def weights_spec(self) -> tuple[int, dict[str, tuple[list[int], str]]]:
        """The first replica's tensors and the highest version any replica serves; refuses a replica whose
        tensor names or shapes differ from the first one's."""
        specs, errors = self._each(self.replicas, lambda r: r.backend.weights_spec())
        for r, e in errors.items():
            raise GeneratorError(f"generation replica {r.url}: {_describe(e)}") from e
        first = self.replicas[0]
        tensors = specs[first][1]
        for r in self.replicas[1:]:
            problem = architecture_difference(tensors, specs[r][1])
            if problem:
                raise IncompatibleServerError(
                    f"the replica at {r.url} does not serve the model of {first.url} ({problem})"
                )
            if {n: d for n, (_, d) in specs[r][1].items()} != {n: d for n, (_, d) in tensors.items()}:
                log.warning("replica %s serves other dtypes than %s (pushes use those)", r.url, first.url)
        versions = {r.url: specs[r][0] for r in self.replicas}
        with self._state:
            for r in self.replicas:
                r.version = specs[r][0]
        if len(set(versions.values())) > 1:
            log.info("generation replicas serve versions %s; the first push brings them level", versions)
        self._tensors, self._start_version = tensors, max(versions.values())
        if self._prober is None:
            self._prober = threading.Thread(target=self._probe_loop, name="replica-probe", daemon=True)
            self._prober.start()
        return self._start_version, tensors

    def version(self) -> int:
        """The lowest version the live replicas serve; one that went back (it restarted) is dropped."""
        live = [r for r in self.replicas if r.live]
        served, errors = self._each(live, lambda r: r.backend.version())
        for r, e in errors.items():
            self._drop(r, e)
        for r, v in served.items():
            if v < r.version:
                self._drop(r, ReplicaRestarted(f"serves version {v}, below the {r.version} it was given"))
        versions = [v for r, v in served.items() if r.live]
        return min(versions) if versions else min(r.version for r in self._live_or_readmit("version"))

    # --- generate -------------------------------------------------------------------------------------
    def generate(self, prompts, n, max_tokens, temperature, seed, top_p=1.0, stop=None, logprobs=False):
        prompts = list(prompts)
        B, cost = len(prompts), n * max_tokens  # cost: the most tokens a prompt occupies its replica with
        token_ids: list = [None] * B  # (B, prompt_len_i)
        completions: list = [None] * B  # (B, n)
        versions: list = [None] * B  # (B,)
        stats: dict[str, dict] = {}
        running: dict[Future, tuple[Replica, range, int]] = {}

        def send(block: range) -> None:
            for replica, part in self._split(block, cost):
                part_seed = None if seed is None else (seed + part.start) % SEED_MODULUS
                sub = [prompts[i] for i in part]
                args = (sub, n, max_tokens, temperature, part_seed, top_p, stop, logprobs)
                future = self._pool.submit(_timed, replica.backend.generate, *args)
                running[future] = (replica, part, replica.version)

        try:
            if B:
                send(range(B))
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    replica, part, given = running.pop(future)
                    self._release(replica, len(part) * cost)
                    try:
                        seconds, out = future.result()
                        if out.weights_version < given:
                            raise ReplicaRestarted(
                                f"answered with version {out.weights_version}, below the {given} it was given"
                            )
                    except GeneratorError as e:
                        if isinstance(e, GeneratorHTTPError) and e.status_code in (400, 422):
                            raise  # the request itself is refused: no replica would take it
                        self._drop(replica, e)
                        failed = stats.setdefault(replica.url, _empty_stats())
                        failed["failed"] = failed.get("failed", 0) + 1
                        send(part)  # the other replicas take its prompts
                        continue
                    for k, i in enumerate(part):
                        token_ids[i], completions[i] = out.prompt_token_ids[k], out.completions[k]
                        versions[i] = out.weights_version
                    s = stats.setdefault(replica.url, _empty_stats())
                    s["prompts"] += len(part)
                    s["tokens"] += sum(len(c.token_ids) for row in out.completions for c in row)
                    s["seconds"] = round(s["seconds"] + seconds, 4)
                    if s["version"] is None or out.weights_version < s["version"]:
                        s["version"] = out.weights_version
        finally:
            for future, (replica, part, _) in running.items():  # only after an error: give up on the rest
                future.cancel()
                self._release(replica, len(part) * cost)
        return GenerationBatch(
            weights_version=min(versions) if B else self.version(),
            prompts=prompts,
            prompt_token_ids=token_ids,
            completions=completions,
            prompt_versions=versions,
            replica_stats={url: {k: v for k, v in s.items() if v is not None} for url, s in stats.items()},
        )

    def _split(self, block: range, cost: int) -> list[tuple[Replica, range]]:
        """Contiguous parts of ``block``, one per live replica that gets any; their tokens reserved."""
        live = self._live_or_readmit("generate")
        parts, start = [], block.start
        with self._state:
            counts = split_by_load(len(block), [r.outstanding for r in live], cost)
            for replica, count in zip(live, counts, strict=True):
                if count:
                    parts.append((replica, range(start, start + count)))
                    replica.outstanding += count * cost
                    start += count
        return parts

    def _release(self, replica: Replica, tokens: int) -> None:
        with self._state:
            replica.outstanding -= tokens

    # --- push -----------------------------------------------------------------------------------------
    @property
    def max_pending(self) -> int:
        return min(r.backend.max_pending for r in self.replicas)

    def snapshot(self, tensors, dtypes, adapter=None) -> ReplicaSnapshot:
        """One copy per transport kind the replicas use (a dropped replica's too: it comes back to it)."""
        by_kind: dict[str, Any] = {}
        for r in self.replicas:
            if r.refused is None and r.kind not in by_kind:
                by_kind[r.kind] = r.backend.snapshot(tensors, dtypes, adapter)
        return ReplicaSnapshot(by_kind, adapter)

    def max_lora_rank(self) -> int | None:
        """The largest LoRA rank every replica takes (None if one takes no adapters)."""
        ranks = [r.backend.max_lora_rank() for r in self.replicas]
        return None if None in ranks else min(ranks)

    def base_version(self) -> int:
        """The highest version of whole weights a replica serves (0: all serve their --model's)."""
        return max(r.backend.base_version() for r in self.replicas)

    def push(self, snapshot: ReplicaSnapshot, version: int) -> dict:
        """Push to every live replica at once; the ones that fail are dropped (and get the latest weights
        when they come back). Raises :class:`NoReplicaLeftError` if none took it."""
        with self._pushing:
            targets = self._live_or_readmit(f"push of version {version}")
            results, errors = self._each(targets, lambda r: self._push_one(r, snapshot, version))
            for r, e in errors.items():
                self._drop(r, e)
            if not results:
                raise self._no_replica_left(f"push of version {version}")
            self._latest = (version, snapshot)
        return {"weights_version": version, "replicas": {r.url: out for r, out in results.items()}}

    def _push_one(self, replica: Replica, snapshot: ReplicaSnapshot, version: int) -> dict:
        payload = snapshot.by_kind.get(replica.kind)
        if payload is None:  # its transport changed since (push: auto fell back from ipc to http)
            tensors = snapshot_tensors(next(iter(snapshot.by_kind.values())))
            dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()}
            payload = replica.backend.snapshot(tensors, dtypes, snapshot.adapter)
        if replica.kind == "shared":
            with self._shared_file:
                out = replica.backend.push(payload, version)
        else:
            out = replica.backend.push(payload, version)
        with self._state:
            replica.version = version
        return out

    # --- faults: drop, probe, re-admit ----------------------------------------------------------------
    def _drop(self, replica: Replica, error: BaseException | str) -> None:
        with self._state:
            if not replica.live:
                return
            replica.live, replica.last_error = False, _describe(error)
        log.warning(
            "generation replica %s dropped (%s); the others take its prompts until it answers again",
            replica.url,
            replica.last_error,
        )

    def _live_or_readmit(self, what: str) -> list[Replica]:
        """The live replicas; with none, those of the dropped ones that can be brought back now."""
        live = [r for r in self.replicas if r.live]
        if not live:
            for r in self.replicas:
                if not r.refused:
                    self._readmit(r)
            live = [r for r in self.replicas if r.live]
        if not live:
            raise self._no_replica_left(what)
        return live

    def _no_replica_left(self, what: str) -> NoReplicaLeftError:
        why = "; ".join(f"{r.url}: {r.refused or r.last_error}" for r in self.replicas)
        return NoReplicaLeftError(f"no generation replica left for the {what} ({why})")

    def _probe_loop(self) -> None:
        while not self._closed.wait(self.probe_seconds):
            for r in self.replicas:
                if not r.live and not r.refused and not self._closed.is_set():
                    try:
                        self._readmit(r)
                    except Exception:  # noqa: BLE001 - the probe must keep running
                        log.exception("probing generation replica %s failed", r.url)

    def _readmit(self, replica: Replica) -> bool:
        """Use ``replica`` again if it answers ``/health`` and serves the same architecture, after pushing
        the latest weights to it (a restarted server serves its model folder's)."""
        try:  # without the push lock: a replica that hangs here holds up no push
            replica.backend.client.health(retries=0)
            spec = replica.backend.client.weights_spec()
        except GeneratorError as e:
            replica.last_error = _describe(e)
            return False
        tensors = {n: (t.shape, t.dtype) for n, t in spec.tensors.items()}
        problem = architecture_difference(self._tensors, tensors)
        with self._pushing:  # no push runs meanwhile (and none reaches it: it is not live)
            if replica.live:
                return True
            target = self._latest[0] if self._latest else self._start_version
            served = spec.weights_version
            if problem or served > target:
                replica.refused = (
                    f"serves another model now ({problem})"
                    if problem
                    else f"serves version {served}, which this trainer did not push (latest: {target})"
                )
                log.error("generation replica %s cannot rejoin: %s", replica.url, replica.refused)
                return False
            if served < target:
                if self._latest is None:
                    return False  # (a start version above 0 is always pushed first by the loop)
                try:
                    self._push_one(replica, self._latest[1], target)
                except GeneratorError as e:
                    replica.last_error = _describe(e)
                    return False
            with self._state:
                replica.live, replica.version, replica.last_error = True, target, None
        how = f"weights pushed again as version {target}" if served < target else f"at version {target}"
        log.warning("generation replica %s is back (%s); it takes prompts again", replica.url, how)
        return True

    # --- helpers --------------------------------------------------------------------------------------
    def _each(self, replicas: Sequence[Replica], call: Callable[[Replica], Any]):
        """``call(r)`` for every replica at once: ``({replica: result}, {replica: exception})``."""
        futures = {r: self._pool.submit(call, r) for r in replicas}
        results, errors = {}, {}
        for r, future in futures.items():
            try:
                results[r] = future.result()
            except Exception as e:  # noqa: BLE001 - returned to the caller, per replica
                errors[r] = e
        return results, errors

    def close(self) -> None:
        self._closed.set()
        if self._prober is not None:
            self._prober.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for r in self.replicas:
            r.backend.close()


def replica_metrics(batch: GenerationBatch, offset: int) -> dict:
    """The metrics-line fields of a batch from several replicas (none for one server): under ``replicas``,
    per URL, its prompts, completion tokens, failed requests and the policy version it sampled with (its
    server version minus ``offset``); under ``replica_gen_seconds`` the seconds of its requests (a timing,
    so a ``*_seconds`` key: the only one of these that differs between identical runs)."""
    if batch.replica_stats is None:
        return {}
    replicas = {
        url: {
            "prompts": s["prompts"],
            "tokens": s["tokens"],
            "failed": s.get("failed", 0),
            "version": s["version"] - offset if "version" in s else None,
        }
        for url, s in batch.replica_stats.items()
    }
    seconds = {url: s["seconds"] for url, s in batch.replica_stats.items()}
    return {"replicas": replicas, "replica_gen_seconds": seconds}


def _empty_stats() -> dict:
    return {"prompts": 0, "tokens": 0, "seconds": 0.0, "version": None}


__all__ = ["NoReplicaLeftError", "ReplicaSetBackend", "ReplicaSnapshot", "replica_metrics", "split_by_load"]
