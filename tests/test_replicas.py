"""One trainer, several generation replicas (trainer_client/replicas.py).

Two tiers. Without servers: the split, the order, the seeds, the versions and the faults against
``FakeServer``, an in-process FAKE of the server's HTTP API (no vLLM; its completions spell out the seed each
prompt was sampled with) behind the real client, ``ServerBackend`` and HTTP transport. With servers: the
session's real server (tests/conftest.py) and one more started here on the same tiny model train together,
and one of them is killed mid-run and restarted on its port.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from urllib.parse import parse_qs

import httpx
import pytest
import torch
from conftest import API_KEY, read_metrics
from server_process import running_server

from trainer_client.backends import ServerBackend, make_backend
from trainer_client.client import GeneratorClient
from trainer_client.config import TrainConfig, load_config
from trainer_client.replicas import (
    NoReplicaLeftError,
    ReplicaSetBackend,
    ReplicaSnapshot,
    replica_metrics,
    split_by_load,
)

TENSORS = {"embed.weight": ([8, 4], "float32"), "norm.weight": ([4], "float32")}


# ----------------------------------------------------------------------------------------------------------
# A FAKE generation server (the HTTP API only, no model) and replica sets over fakes
# ----------------------------------------------------------------------------------------------------------
class FakeServer:
    """FAKE: answers /health, /weights, /generate and PUT /weights like the real server, without a model.

    Completion ``k`` of prompt ``i`` of a request with seed ``s`` has text ``"<prompt>|seed=<s+i>|k=<k>"``
    and token ids ``[s + i, k]``: what the real server's per-prompt seeds would make reproducible. ``up =
    False`` refuses connections (a stopped server); ``restart()`` comes back at version 0."""

    def __init__(self, name: str, version: int = 0, tensors=TENSORS):
        self.url, self.version, self.tensors, self.up = f"http://{name}", version, dict(tensors), True
        self.requests: list[dict] = []  # bodies of POST /generate
        self.pushes: list[int] = []  # versions of PUT /weights that landed

    def restart(self) -> None:
        self.version, self.up = 0, True

    def handle(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/health":
            return httpx.Response(200, json={"status": "ok", "model": "fake", "weights_version": self.version,
                                             "vllm_version": "fake", "device": "cpu"})  # fmt: skip
        if path == "/weights" and request.method == "GET":
            tensors = {n: {"shape": s, "dtype": d} for n, (s, d) in self.tensors.items()}
            return httpx.Response(200, json={"weights_version": self.version, "tensors": tensors})
        if path == "/weights" and request.method == "PUT":
            version = int(parse_qs(request.url.query.decode())["version"][0])
            if version <= self.version:
                return httpx.Response(409, json={"detail": f"version {version} <= {self.version}"})
            self.version = version
            self.pushes.append(version)
            return httpx.Response(
                200, json={"weights_version": version, "bytes": len(request.content), "load_seconds": 0.0}
            )
        if path == "/generate":
            body = json.loads(request.content)
            self.requests.append(body)
            seed = body["seed"]
            results = [
                {"prompt_token_ids": [len(prompt)],
                 "completions": [{"text": f"{prompt}|seed={seed + i}|k={k}", "token_ids": [seed + i, k],
                                  "logprobs": None, "finish_reason": "stop"} for k in range(body["n"])]}
                for i, prompt in enumerate(body["prompts"])
            ]  # fmt: skip
            return httpx.Response(200, json={"weights_version": self.version, "results": results})
        return httpx.Response(404, json={"detail": "not found"})


def fake_backend(server: FakeServer) -> ServerBackend:
    client = GeneratorClient(
        server.url, max_retries=1, backoff=0.01, transport=httpx.MockTransport(server.handle)
    )
    return ServerBackend(client, push="http")


@pytest.fixture
def fakes():
    """Two fake replicas in a replica set, started as the loop starts a backend."""
    servers = [FakeServer("replica-a"), FakeServer("replica-b")]
    backend = ReplicaSetBackend([fake_backend(s) for s in servers], probe_seconds=0.05)
    backend.wait_until_ready(5)
    backend.weights_spec()
    yield servers, backend
    backend.close()


def weights(value: float) -> dict[str, torch.Tensor]:
    return {n: torch.full(shape, value) for n, (shape, _) in TENSORS.items()}


def push(backend, version: int) -> dict:
    dtypes = {n: d for n, (_, d) in TENSORS.items()}
    return backend.push(backend.snapshot(weights(float(version)), dtypes), version)


def generate(backend, prompts, seed=100):
    return backend.generate(prompts, n=3, max_tokens=8, temperature=1.0, seed=seed)


def wait_for(condition, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


PROMPTS = [f"prompt {i}" for i in range(7)]


# ----------------------------------------------------------------------------------------------------------
# Without servers
# ----------------------------------------------------------------------------------------------------------
def test_split_evens_out_the_tokens_in_flight():
    assert split_by_load(8, [0, 0], cost=10) == [4, 4]
    assert split_by_load(7, [0, 0, 0], cost=10) == [3, 2, 2]
    assert split_by_load(8, [40, 0], cost=10) == [2, 6]  # 40 + 20 = 0 + 60
    assert split_by_load(3, [1000, 0], cost=10) == [0, 3]
    assert split_by_load(0, [0, 0], cost=10) == [0, 0]


def test_prompts_split_order_restored_and_seeds_independent_of_the_split(fakes):
    servers, backend = fakes
    batch = generate(backend, PROMPTS)
    # one request per replica, contiguous blocks of 4 and 3 prompts, all K samples of a prompt in one
    assert [len(s.requests) for s in servers] == [1, 1]
    assert [s.requests[0]["prompts"] for s in servers] == [PROMPTS[:4], PROMPTS[4:]]
    assert [s.requests[0]["seed"] for s in servers] == [100, 104]
    # results in prompt order, prompt i sampled with seed 100 + i as in one request of the whole batch
    assert [[c.text for c in row] for row in batch.completions] == [
        [f"{p}|seed={100 + i}|k={k}" for k in range(3)] for i, p in enumerate(PROMPTS)
    ]
    alone = FakeServer("alone")
    one = fake_backend(alone).generate(PROMPTS, n=3, max_tokens=8, temperature=1.0, seed=100)
    assert [[c.token_ids for c in row] for row in batch.completions] == [
        [c.token_ids for c in row] for row in one.completions
    ]
    assert batch.prompt_token_ids == one.prompt_token_ids
    assert batch.weights_version == 0 and batch.prompt_versions == [0] * 7
    stats = batch.replica_stats
    assert {url: (s["prompts"], s["tokens"], s["version"]) for url, s in stats.items()} == {
        "http://replica-a": (4, 4 * 3 * 2, 0),
        "http://replica-b": (3, 3 * 3 * 2, 0),
    }


def test_split_follows_the_tokens_already_in_flight(fakes):
    servers, backend = fakes
    backend.replicas[0].outstanding = 3 * 8 * 4  # as if 4 prompts (K=3, 8 tokens) were still running on a
    try:
        generate(backend, PROMPTS[:6])
    finally:
        backend.replicas[0].outstanding = 0
    assert [len(s.requests[0]["prompts"]) for s in servers] == [1, 5]


def test_every_version_goes_to_every_replica(fakes):
    servers, backend = fakes
    a, b = servers
    out = push(backend, 1)
    assert out["weights_version"] == 1 and set(out["replicas"]) == {s.url for s in servers}
    assert [s.pushes for s in servers] == [[1], [1]]
    assert len(backend.snapshot(weights(2.0), {n: d for n, (_, d) in TENSORS.items()}).by_kind) == 1
    batch = generate(backend, PROMPTS)
    assert batch.prompt_versions == [1] * 7
    # what the loop logs: policy versions (server version - offset), the seconds apart as a timing
    fields = replica_metrics(batch, offset=1)
    assert fields["replicas"] == {
        a.url: {"prompts": 4, "tokens": 24, "failed": 0, "version": 0},
        b.url: {"prompts": 3, "tokens": 18, "failed": 0, "version": 0},
    }
    assert set(fields["replica_gen_seconds"]) == {a.url, b.url}


def test_a_push_that_fails_on_one_replica_drops_that_one_only(fakes):
    servers, backend = fakes
    a, b = servers
    b.up = False
    assert set(push(backend, 1)["replicas"]) == {a.url}  # the push succeeds: a took it
    batch = generate(backend, PROMPTS)
    assert set(batch.replica_stats) == {a.url} and batch.prompt_versions == [1] * 7
    # a snapshot of another transport kind than a replica's own is converted for it (after push: auto
    # fell back from ipc to http, say): here a plain dict of host tensors, as push: shared holds them
    b.up = True  # back without a restart: still at version 0, so version 1 goes to it first
    wait_for(lambda: backend.replicas[1].live)
    assert b.pushes == [1]
    backend.push(ReplicaSnapshot({"shared": weights(2.0)}), 2)
    assert (a.pushes, b.pushes) == ([1, 2], [1, 2])


def test_a_lost_replica_is_dropped_and_rejoins_with_the_latest_weights(fakes, caplog):
    servers, backend = fakes
    a, b = servers
    push(backend, 1)
    b.up = False
    with caplog.at_level(logging.WARNING, logger="trainer_client.replicas"):
        batch = generate(backend, PROMPTS)  # b's prompts go to a within the call
        assert batch.replica_stats["http://replica-b"] == {"prompts": 0, "tokens": 0, "seconds": 0.0,
                                                           "failed": 1}  # fmt: skip
        assert batch.replica_stats["http://replica-a"]["prompts"] == 7
        seeds = [c.token_ids[0] for row in batch.completions for c in row]
        assert seeds == [100 + i for i in range(7) for _ in range(3)]
        assert [r["seed"] for r in a.requests] == [100, 104]  # b's block went to a with its own seed
        push(backend, 2)  # a alone takes it
        assert (a.pushes, b.pushes) == ([1, 2], [1])
        b.restart()  # back, at version 0 (a fresh server)
        wait_for(lambda: backend.replicas[1].live)
    assert b.pushes == [1, 2] and b.version == 2  # version 2 pushed again before b was used
    assert any("dropped" in r.getMessage() for r in caplog.records)
    assert any("is back (weights pushed again as version 2)" in r.getMessage() for r in caplog.records)
    batch = generate(backend, PROMPTS)
    assert batch.prompt_versions == [2] * 7 and batch.replica_stats["http://replica-b"]["prompts"] == 3


def test_a_restarted_replica_is_noticed_by_its_version(fakes):
    """A replica that answers with a version below the one it was given has lost its weights: its samples
    are thrown away (the batch never reports the older version) and it gets the weights again."""
    servers, backend = fakes
    push(backend, 3)
    backend.probe_seconds = 3600  # no probe: the next generate brings it back (a replica is left)
    servers[1].restart()
    batch = generate(backend, PROMPTS)
    assert batch.weights_version == 3 and batch.prompt_versions == [3] * 7
    assert batch.replica_stats["http://replica-b"]["failed"] == 1
    servers[0].up = False  # now only b can answer: it is brought back (version 3 pushed again) first
    batch = generate(backend, PROMPTS)
    assert servers[1].pushes == [3, 3] and batch.prompt_versions == [3] * 7


def test_no_replica_left_names_every_url(fakes):
    servers, backend = fakes
    for s in servers:
        s.up = False
    with pytest.raises(NoReplicaLeftError, match="no generation replica left") as error:
        generate(backend, PROMPTS)
    assert "http://replica-a: GeneratorUnavailable" in str(error.value)
    assert "http://replica-b: GeneratorUnavailable" in str(error.value)
    with pytest.raises(NoReplicaLeftError):
        push(backend, 1)


def test_replicas_are_brought_to_one_version_and_another_architecture_is_refused():
    from trainer_client.train import IncompatibleServerError

    servers = [FakeServer("a", version=0), FakeServer("b", version=5)]
    backend = ReplicaSetBackend([fake_backend(s) for s in servers])
    try:
        assert backend.weights_spec()[0] == 5  # the loop's first push (version 6) brings both level
    finally:
        backend.close()
    other = {**TENSORS, "embed.weight": ([16, 4], "float32")}
    servers = [FakeServer("a"), FakeServer("b"), FakeServer("wide", tensors=other)]
    backend = ReplicaSetBackend([fake_backend(s) for s in servers])
    try:
        with pytest.raises(
            IncompatibleServerError, match=r"replica at http://wide .*embed.weight: \[16, 4\] vs"
        ):
            backend.weights_spec()
    finally:
        backend.close()


def test_server_url_list_in_config_and_backend():
    config = load_config(None, ["model=m", "server_url=[http://a:8000, http://b:8000]"])
    assert config.server_url == ["http://a:8000", "http://b:8000"]
    backend = make_backend(config)
    try:
        assert isinstance(backend, ReplicaSetBackend)
        assert [r.url for r in backend.replicas] == ["http://a:8000", "http://b:8000"]
    finally:
        backend.close()
    config = load_config(None, ["model=m", "server_url=[http://a:8000]"])
    backend = make_backend(config)
    assert config.server_url == "http://a:8000" and isinstance(backend, ServerBackend)
    backend.close()
    with pytest.raises(ValueError, match="server_url"):
        load_config(None, ["model=m", "server_url=[http://a:8000, b:8000]"])


# ----------------------------------------------------------------------------------------------------------
# With servers: the session's server and one more, both real vLLM CPU servers on the tiny model
# ----------------------------------------------------------------------------------------------------------
class ServerSlot:
    """A second real server that a test may stop and start again on the same port."""

    def __init__(self, model_dir):
        self.model_dir, self.port, self.handle, self.error = model_dir, None, None, None
        self._context = None

    def start(self) -> None:
        try:
            self._context = running_server(
                self.model_dir, "--api-key", API_KEY, "--max-model-len", "256", port=self.port
            )
            self.handle = self._context.__enter__()
            self.port = int(self.handle.url.rsplit(":", 1)[1])
        except BaseException as e:  # noqa: BLE001 - raised by the test that waits for it
            self.error = e

    def stop(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def replica_b(request, tiny_model_dir):
    """A second server on the tiny model, started while the session's server starts (if it is not up)."""
    slot = ServerSlot(tiny_model_dir)
    starting = threading.Thread(target=slot.start)
    starting.start()
    request.getfixturevalue("server")
    starting.join()
    if slot.error is not None:
        raise slot.error
    yield slot
    slot.stop()


@pytest.fixture
def run_config(server, replica_b, tiny_model_dir, length_task, tmp_path) -> TrainConfig:
    return TrainConfig(
        model=str(tiny_model_dir), server_url=[server.url, replica_b.handle.url], api_key=API_KEY,
        task=str(length_task), reward="length", batch_size=4, samples_per_prompt=4, max_new_tokens=24,
        learning_rate=1e-3, max_staleness=1, max_retries=2, progress_bar=False, precision="fp32", seed=0,
        output_dir=str(tmp_path),
    )  # fmt: skip


def spy_on_batches(backend) -> list:
    """Every batch the backend generates, recorded (the loop does not log per-replica figures yet)."""
    batches, real = [], backend.generate

    def generate_and_keep(*args, **kwargs):
        batch = real(*args, **kwargs)
        batches.append(batch)
        return batch

    backend.generate = generate_and_keep
    return batches


def test_two_replicas_train_together(run_config, server, replica_b):
    from trainer_client.train import run_training

    config = run_config.model_copy(update={"steps": 4})
    backend = make_backend(config)
    batches = spy_on_batches(backend)
    try:
        summary = run_training(config, backend=backend)
    finally:
        backend.close()
    last = summary["server_version"]
    assert summary["server_version"] == 4 + summary["version_offset"]
    assert server.weights_version() == replica_b.handle.weights_version() == last
    assert len(batches) == 4
    for batch in batches:  # both replicas sampled every batch, half of it each
        assert {url: s["prompts"] for url, s in batch.replica_stats.items()} == {
            server.url: 2,
            replica_b.handle.url: 2,
        }
        assert batch.weights_version == min(batch.prompt_versions)
    records = read_metrics(config.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 <= r["staleness"] <= config.max_staleness for r in records)


def test_a_replica_killed_mid_run_rejoins_without_stopping_the_run(run_config, server, replica_b, caplog):
    """Replica b is stopped after step 2 and started again on its port; the run goes on with a alone, b gets
    the latest weights when it is back and then samples again; both end at the last version."""
    from trainer_client.train import run_training

    config = run_config.model_copy(update={"steps": 7})
    backend = make_backend(config)
    batches = spy_on_batches(backend)
    b_url = replica_b.handle.url
    b = next(r for r in backend.replicas if r.url == b_url)
    restart = threading.Thread(target=replica_b.start)
    rejoined_at: list[int] = []

    def dropped() -> bool:  # by a failed generate or a failed push, whichever came first
        return any(f"replica {b_url} dropped" in r.getMessage() for r in caplog.records)

    def on_step(record):
        if record["step"] == 2:
            replica_b.stop()  # its process group stopped mid-run; started again on its port below
            restart.start()
        if record["step"] == 3:  # hold training until b has been dropped and has come back
            deadline = time.monotonic() + 900
            while not (dropped() and b.live):
                assert replica_b.error is None, replica_b.error
                assert time.monotonic() < deadline, "replica b did not come back"
                time.sleep(0.5)
            rejoined_at.append(len(batches))

    try:
        with caplog.at_level(logging.WARNING, logger="trainer_client"):
            summary = run_training(config, backend=backend, on_step=on_step)
    finally:
        backend.close()
        restart.join()
    last = summary["server_version"]
    assert summary["server_version"] == 7 + summary["version_offset"]
    assert server.weights_version() == replica_b.handle.weights_version() == last
    records = read_metrics(config.output_dir)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert all(0 <= r["staleness"] <= config.max_staleness for r in records)
    assert any(x.replica_stats.get(b_url, {}).get("prompts") for x in batches[rejoined_at[0] :])
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"replica {b_url} dropped" in m for m in messages)
    assert any(f"replica {b_url} is back (weights pushed again" in m for m in messages)
