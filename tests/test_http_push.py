"""``push: http`` streamed from memory (issue 10): the body the client builds from the snapshot's own memory,
its digest (``X-Weights-BLAKE3`` where the server offers it, else ``X-Weights-Chunked-SHA256``, chunks hashed
in parallel) computed while the snapshot is copied, and what the server does with pushes that break off,
arrive corrupted or carry a malformed digest; then the server's in-memory staging (``/dev/shm``) on its own,
without an engine.

The real-server tests use the session server of ``conftest.py`` (its ``--work-dir`` puts staging on disk;
the staging code is the same in memory, which the ``WeightStore`` tests below cover). Refusals already
tested in ``test_server_http.py`` (wrong digest header, truncated file, wrong tensors) are not repeated."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import httpx
import numpy as np
import pytest
import torch
from conftest import API_KEY, probe, same_outputs, same_weights
from safetensors.torch import load_file, save_file
from starlette.requests import ClientDisconnect

from generator_server import weights as server_weights
from generator_server.errors import ApiError
from generator_server.weights import (
    DIGESTS,
    MEMORY_ROOT_PREFIX,
    ChunkedDigest,
    WeightStore,
    parse_blake3,
    parse_chunked_sha256,
)
from online_dpo_protocol.digests import chunked_sha256
from trainer_client import client as client_module
from trainer_client.backends import ServerBackend
from trainer_client.client import Blake3Digest, ChunkedSha256, GeneratorClient, PushTarget, SafetensorsBody
from trainer_client.transports.base import host_snapshot
from trainer_client.transports.http import HttpTransport, pick_digest


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype a model holds, a 0-d and an empty tensor, names out of order."""
    g = torch.Generator().manual_seed(0)
    return {
        "z.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(3, 5, generator=g),
        "positions": torch.arange(7),
        "scale": torch.tensor(0.25),
        "empty": torch.zeros(0, 3),
        "half": torch.randn(2, 2, generator=g).half(),
        "mask": torch.tensor([True, False, True]),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
    }


def body_bytes(body: SafetensorsBody) -> bytes:
    return b"".join(bytes(chunk) for chunk in body.chunks())


MiB = 1 << 20


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def reference_chunked_sha256(data: bytes, chunk_bytes: int) -> str:
    """The header's definition, written the plain way: SHA-256 of the chunks' SHA-256 digests."""
    digests = b""
    for start in range(0, len(data), chunk_bytes):
        digests += hashlib.sha256(data[start : start + chunk_bytes]).digest()
    return f"{chunk_bytes}:{hashlib.sha256(digests).hexdigest()}"


# --- the body ------------------------------------------------------------------------------------------
def test_streamed_body_is_byte_identical_to_save_file(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "ref.safetensors")
    expected = (tmp_path / "ref.safetensors").read_bytes()
    body = SafetensorsBody(tensors)
    assert body.nbytes == len(expected)
    assert body_bytes(body) == expected
    assert body_bytes(body) == expected  # chunks() starts again each time (a retry re-sends it all)
    assert body.sha256() == hashlib.sha256(expected).hexdigest()
    for name, view in zip(body.order, body.views, strict=False):  # read in place, not copied
        if view.nbytes:
            assert np.frombuffer(view, dtype=np.uint8).ctypes.data == tensors[name].data_ptr()


def fake_server(got: dict, digests: list[str] | None, fail_first_put: bool = False) -> GeneratorClient:
    """A client of an httpx.MockTransport standing for a server whose ``GET /weights`` lists ``digests``
    (None: a server older than the field, which does not say); it records each PUT's body and digest
    headers in ``got``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            got["gets"] = got.get("gets", 0) + 1
            spec = {"weights_version": 0, "tensors": {}} | ({"digests": digests} if digests else {})
            return httpx.Response(200, json=spec)
        got.setdefault("bodies", []).append(b"".join(request.stream))
        got["headers"] = {k: v for k, v in request.headers.items() if k.startswith("x-weights")}
        if fail_first_put and len(got["bodies"]) == 1:
            return httpx.Response(502, text="try again")
        return httpx.Response(200, json={"weights_version": 1, "bytes": 0, "load_seconds": 0.0})

    return GeneratorClient("http://fake", transport=httpx.MockTransport(handler), backoff=0.001)


@pytest.mark.parametrize("digests", [None, ["chunked-sha256", "sha256"], list(DIGESTS)])
def test_snapshot_hashes_the_body_it_sends(digests):
    """The digest is the server's first choice that a snapshot can be hashed with: BLAKE3 when it is
    offered, else (a server older than ``digests`` included) the chunked SHA-256."""
    got = {}
    client = fake_server(got, digests, fail_first_put=True)
    live = {n: t.float() if t.is_floating_point() else t for n, t in mixed_tensors().items()}
    served = {n: "bfloat16" for n in live} | {"a.weight": "float32"}
    expected = body_bytes(SafetensorsBody(host_snapshot(live, served)))
    transport = HttpTransport(client)
    snapshot = transport.snapshot(live, served)
    for t in live.values():  # the optimizer steps on: the snapshot does not change
        t.logical_not_() if t.dtype == torch.bool else t.add_(1)
    transport.push(snapshot, version=1)
    transport.close()
    assert got["bodies"] == [expected] * 2  # retried from the first byte
    if digests is not None and "blake3" in digests:
        assert got["headers"] == {"x-weights-blake3": snapshot.digest.result()}
        assert snapshot.digest.result() == b3(expected)
    else:
        chunk = client_module.DIGEST_CHUNK_BYTES
        assert got["headers"] == {"x-weights-chunked-sha256": snapshot.digest.result()}
        assert snapshot.digest.result() == reference_chunked_sha256(expected, chunk)


def test_digest_choice_follows_the_servers_answer():
    """On the parsed ``GET /weights`` answer: the first digest the server lists that a snapshot can be
    hashed with; an answer without ``digests`` (an older server) gets the chunked SHA-256."""
    assert pick_digest(fake_server({}, None).weights_spec().digests) == "chunked-sha256"
    assert pick_digest(PushTarget().digests) == "chunked-sha256"
    assert pick_digest(list(DIGESTS)) == "blake3"
    assert pick_digest(["chunked-sha256", "blake3"]) == "chunked-sha256"  # the server's order
    assert pick_digest(["sha256"]) == "chunked-sha256"
    assert pick_digest(["some-future-digest", "blake3"]) == "blake3"


def test_a_snapshot_hashed_for_another_server_gets_the_digest_this_one_checks():
    """Replicas share one snapshot per transport kind: one hashed with BLAKE3 for a new server, pushed to an
    older one, goes with the chunked SHA-256 (computed then), never with a header that server ignores."""
    got_new, got_old = {}, {}
    new = HttpTransport(fake_server(got_new, list(DIGESTS)))
    old = HttpTransport(fake_server(got_old, None))
    snapshot = new.snapshot(mixed_tensors(), {n: "float32" for n in mixed_tensors()})
    assert snapshot.digest.name == "blake3"
    new.push(snapshot, version=1)
    old.push(snapshot, version=1)
    new.close(), old.close()
    body = body_bytes(snapshot.body)
    assert got_new["headers"] == {"x-weights-blake3": b3(body)}
    chunk = client_module.DIGEST_CHUNK_BYTES
    assert got_old["headers"] == {"x-weights-chunked-sha256": reference_chunked_sha256(body, chunk)}


def test_a_server_that_cannot_be_asked_gets_the_chunked_digest_and_is_asked_again():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"weights_version": 0, "tensors": {}, "digests": list(DIGESTS)})

    client = GeneratorClient("http://fake", transport=httpx.MockTransport(handler), max_retries=3)
    transport = HttpTransport(client)
    tensors = {"w": torch.ones(3)}
    assert transport.snapshot(tensors, {"w": "float32"}).digest.name == "chunked-sha256"
    assert transport.snapshot(tensors, {"w": "float32"}).digest.name == "blake3"
    transport.snapshot(tensors, {"w": "float32"})
    transport.close()
    assert calls == ["GET", "GET"]  # not retried (a snapshot must not wait), asked once it answered


def test_body_blake3_is_the_blake3_of_the_file_save_file_writes(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path)
    with open(path, "rb") as f:
        expected = blake3.blake3(f.read()).hexdigest()
    body = SafetensorsBody(tensors)
    assert body.blake3() == expected
    with ThreadPoolExecutor(1) as thread:  # fed piece by piece from a thread, as a snapshot feeds it
        digest = Blake3Digest(thread)
        for chunk in body.chunks():
            digest.add(chunk)
        assert (
            digest.result() == expected == server_weights.new_blake3().update(path.read_bytes()).hexdigest()
        )
    digest.close()
    with pytest.raises(RuntimeError, match="after close"):
        digest.add(b"x")


# --- the chunked digest ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, MiB + 1, 3 * MiB + 12345])
def test_chunked_digest_matches_the_reference(size):
    """Client and server compute the header's definition for bodies empty, shorter than, equal to and longer
    than one chunk, whatever pieces the bytes arrive in (pieces straddle the chunk boundaries)."""
    data = os.urandom(size)
    expected = reference_chunked_sha256(data, MiB)
    assert chunked_sha256(data, MiB) == expected  # (the protocol's definition, which both sides use)
    with ThreadPoolExecutor(3) as pool:
        digest = ChunkedSha256(pool, MiB)
        for start in range(0, size, 300_001):
            digest.add(memoryview(data)[start : start + 300_001])
        assert digest.result() == expected

        async def arriving() -> str:
            digest = ChunkedDigest(pool, MiB, max_pending=1)
            for start in range(0, size, 65_537):
                digest.add(data[start : start + 65_537])
                await digest.throttle()
            return await digest.hexdigest()

        assert asyncio.run(arriving()) == expected.split(":")[1]
    if size:  # one byte flipped anywhere changes it
        flipped = bytearray(data)
        flipped[size // 2] ^= 0x80
        assert chunked_sha256(bytes(flipped), MiB) != expected
    body = SafetensorsBody(mixed_tensors())
    assert body.chunked_sha256(MiB) == reference_chunked_sha256(body_bytes(body), MiB)


def test_push_weights_sends_the_chunked_digest_and_push_file_the_plain_one(tmp_path):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = b"".join(request.stream)
        seen.append((body, {k: v for k, v in request.headers.items() if k.startswith("x-weights")}))
        return httpx.Response(200, json={"weights_version": 1, "bytes": len(body), "load_seconds": 0.0})

    client = GeneratorClient("http://fake", transport=httpx.MockTransport(handler))
    client.push_weights(mixed_tensors(), version=1)
    body, headers = seen[-1]
    chunk = client_module.DIGEST_CHUNK_BYTES
    assert headers == {"x-weights-chunked-sha256": reference_chunked_sha256(body, chunk)}
    sha = hashlib.sha256(body).hexdigest()
    client.push_body(SafetensorsBody(mixed_tensors()), version=2, sha256=sha)  # as before: plain only
    assert seen[-1][1] == {"x-weights-sha256": sha}
    (tmp_path / "w.safetensors").write_bytes(body)
    client.push_weights_file(tmp_path / "w.safetensors", version=3)
    assert seen[-1] == (body, {"x-weights-sha256": sha})
    with pytest.raises(ValueError, match="power of two"):
        ChunkedSha256(None, 3 * MiB)
    client.push_body(SafetensorsBody(mixed_tensors()), version=4, blake3=b3(body))
    assert seen[-1] == (body, {"x-weights-blake3": b3(body)})


# --- against the real server ------------------------------------------------------------------------
@pytest.fixture
def gen(server):
    with GeneratorClient(server.url, api_key=API_KEY, timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture
def transport(gen):
    t = HttpTransport(gen)
    yield t
    t.close()


def served_dtypes(gen: GeneratorClient) -> dict[str, str]:
    return {name: spec.dtype for name, spec in gen.weights_spec().tensors.items()}


def settle(work_dir: Path, version: int, timeout: float = 30.0) -> None:
    """Wait until the server has cleaned up after a broken push: only the served copy is left."""
    deadline = time.monotonic() + timeout
    while sorted(p.name for p in work_dir.iterdir()) != [f"served-v{version}"]:
        assert time.monotonic() < deadline, sorted(p.name for p in work_dir.iterdir())
        time.sleep(0.1)


def test_backend_hands_its_transport_the_servers_digests():
    """The trainer's backend reads ``GET /weights`` once at start-up; its HTTP transport hashes with the
    digest listed there instead of asking the server again."""
    got = {}
    backend = ServerBackend(fake_server(got, list(DIGESTS)), push="http")
    backend.weights_spec()
    live = {n: t.float() if t.is_floating_point() else t for n, t in mixed_tensors().items()}
    snapshot = backend.snapshot(live, {n: "bfloat16" for n in live})
    backend.push(snapshot, version=1)
    backend.close()
    assert got["gets"] == 1
    assert got["headers"] == {"x-weights-blake3": b3(got["bodies"][0])}


class RecordingTransport(httpx.HTTPTransport):
    """httpx's own network transport, remembering the method, path and digest headers of each request."""

    def __init__(self):
        super().__init__()
        self.sent: list[tuple[str, str, dict[str, str]]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        digests = {k: v for k, v in request.headers.items() if k.startswith("x-weights")}
        self.sent.append((request.method, request.url.path, digests))
        return super().handle_request(request)


def test_push_of_a_snapshot_serves_those_weights(server, client, make_weights):
    """The streamed push serves exactly what the same tensors pushed as a file serve, and not the old; the
    server offers BLAKE3, so the push carries ``X-Weights-BLAKE3`` (and no other digest)."""
    network = RecordingTransport()
    gen = GeneratorClient(server.url, api_key=API_KEY, timeout=120, max_retries=0, transport=network)
    transport = HttpTransport(gen)
    version = server.weights_version() + 1
    before = probe(client)
    path = make_weights(seed=41)
    try:
        snapshot = transport.snapshot(load_file(path), served_dtypes(gen))
        started = time.perf_counter()
        out = transport.push(snapshot, version)
        pushed = time.perf_counter() - started
    finally:
        transport.close()
        gen.close()
    assert out["weights_version"] == version and out["bytes"] == path.stat().st_size
    assert 0 < out["receive_seconds"] < pushed  # the server's side of the upload, within the client's
    with open(path, "rb") as f:
        expected = blake3.blake3(f.read()).hexdigest()
    assert network.sent[-1] == ("PUT", "/weights", {"x-weights-blake3": expected})
    streamed = probe(client)
    assert streamed["weights_version"] == version and not same_weights(streamed, before)
    assert server.push(path, version + 1).status_code == 200  # the reference: the file's bytes
    assert same_weights(probe(client), streamed)


def _half_by_socket(server, version: int, body: SafetensorsBody, digest: str) -> None:
    """Headers and half of the body over a raw socket, then the connection is dropped."""
    data = body_bytes(body)
    head = (
        f"PUT /weights?version={version} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {len(data)}\r\nX-Weights-Chunked-SHA256: {digest}\r\n\r\n"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(0.2)  # let the server take in the first half


def _half_by_failing_stream(server, version: int, body: SafetensorsBody, digest: str) -> None:
    """httpx streaming the body whose source fails half-way (the sender dies mid-push)."""

    def chunks():
        sent = 0
        for chunk in body.chunks():
            yield chunk
            sent += len(chunk)
            if sent >= body.nbytes // 2:
                raise RuntimeError("the sender died")

    headers = {"Content-Length": str(body.nbytes), "X-Weights-Chunked-SHA256": digest}
    with server.client() as c, pytest.raises(RuntimeError, match="the sender died"):
        c.put("/weights", params={"version": version}, content=chunks(), headers=headers)


@pytest.mark.parametrize("break_off", [_half_by_socket, _half_by_failing_stream])
def test_push_broken_off_half_way_changes_nothing(
    server, client, gen, transport, make_weights, server_work_dir, break_off
):
    dtypes = served_dtypes(gen)
    version = server.weights_version() + 1
    transport.push(transport.snapshot(load_file(make_weights(seed=42)), dtypes), version)
    before = probe(client)

    new = transport.snapshot(load_file(make_weights(seed=43)), dtypes)
    break_off(server, version + 1, new.body, new.digest.result())
    settle(server_work_dir, version)
    assert server.weights_version() == version
    assert same_outputs(probe(client), before)  # the previous version, whole

    transport.push(new, version + 1)  # the next full push works
    after = probe(client)
    assert after["weights_version"] == version + 1 and not same_weights(after, before)
    settle(server_work_dir, version + 1)


def _put(server, version: int, data: bytes, headers: dict[str, str]) -> httpx.Response:
    with server.client() as c:
        return c.put("/weights", params={"version": version}, content=data, headers=headers)


def all_digests(data: bytes) -> dict[str, str]:
    """Every digest header of ``data`` (the chunked one in 1 MiB chunks: more than one for the tiny model's
    1.8 MB)."""
    return {
        "X-Weights-SHA256": hashlib.sha256(data).hexdigest(),
        "X-Weights-Chunked-SHA256": reference_chunked_sha256(data, MiB),
        "X-Weights-BLAKE3": b3(data),
    }


@pytest.mark.parametrize(
    "right, wrong, message",
    [
        ([], ["X-Weights-SHA256"], "SHA-256 mismatch"),
        ([], ["X-Weights-Chunked-SHA256"], "chunked SHA-256 mismatch"),
        ([], ["X-Weights-BLAKE3"], "BLAKE3 mismatch"),
        (["X-Weights-SHA256"], ["X-Weights-Chunked-SHA256"], "chunked SHA-256 mismatch"),
        (["X-Weights-SHA256", "X-Weights-Chunked-SHA256"], ["X-Weights-BLAKE3"], "BLAKE3 mismatch"),
        (["X-Weights-SHA256", "X-Weights-BLAKE3"], ["X-Weights-Chunked-SHA256"], "chunked SHA-256 mismatch"),
        (["X-Weights-Chunked-SHA256", "X-Weights-BLAKE3"], ["X-Weights-SHA256"], "SHA-256 mismatch"),
    ],
)
def test_corrupted_body_is_refused(
    server, client, gen, transport, make_weights, server_work_dir, right, wrong, message
):
    """One byte flipped in the tensor data on the way: still a well-formed file of the right tensors, so
    only the digest (of the original, in the header) tells. Headers in ``right`` are those of the corrupted
    bytes, so they pass: the one in ``wrong`` alone must refuse them (every header given is checked). Then
    the original bytes with all three headers right are served."""
    dtypes = served_dtypes(gen)
    version = server.weights_version() + 1
    transport.push(transport.snapshot(load_file(make_weights(seed=44)), dtypes), version)
    before = probe(client)

    new = transport.snapshot(load_file(make_weights(seed=45)), dtypes)
    original = body_bytes(new.body)
    data = bytearray(original)
    data[len(new.body.head) + 1000] ^= 0x01
    of_original, of_data = all_digests(original), all_digests(bytes(data))
    headers = {h: of_data[h] for h in right} | {h: of_original[h] for h in wrong}
    response = _put(server, version + 1, bytes(data), headers)
    detail = response.json()["detail"]
    assert response.status_code == 400 and detail.startswith(message), detail
    (header,) = wrong
    assert f"body hashes to {of_data[header]}, {header} says {of_original[header]}" in detail
    assert server.weights_version() == version
    assert same_outputs(probe(client), before)
    settle(server_work_dir, version)  # the staging folder is gone

    response = _put(server, version + 1, original, of_original)
    assert response.status_code == 200, response.text  # the right bytes, all three digests: served
    after = probe(client)
    assert after["weights_version"] == version + 1 and not same_weights(after, before)


@pytest.mark.parametrize(
    "value, problem",
    [
        ("3145728:" + "0" * 64, "power of two"),  # 3 MiB
        ("524288:" + "0" * 64, "power of two"),  # 512 KiB: too small
        (f"{2 << 30}:" + "0" * 64, "power of two"),  # 2 GiB: too large
        ("16MiB:" + "0" * 64, "<chunk_bytes>"),
        ("0" * 64, "<chunk_bytes>"),  # no chunk size
        ("1048576:" + "g" * 64, "digest is not"),
        ("1048576:" + "0" * 63, "digest is not"),
    ],
)
def test_malformed_chunked_digest_is_refused(server, client, server_work_dir, value, problem):
    version = server.weights_version()
    before = probe(client)
    response = _put(server, version + 1, b"x" * 100, {"X-Weights-Chunked-SHA256": value})
    assert response.status_code == 400 and problem in response.json()["detail"], response.text
    assert "X-Weights-Chunked-SHA256" in response.json()["detail"]
    assert server.weights_version() == version and same_outputs(probe(client), before)
    assert not [p for p in server_work_dir.iterdir() if p.name.startswith("staging-")]


@pytest.mark.parametrize("value", ["0" * 63, "0" * 65, "g" * 64, f"1048576:{'0' * 64}", "", "0x" + "0" * 62])
def test_malformed_blake3_digest_is_refused(server, client, server_work_dir, value):
    version = server.weights_version()
    before = probe(client)
    response = _put(server, version + 1, b"x" * 100, {"X-Weights-BLAKE3": value})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "X-Weights-BLAKE3 must be 64 hexadecimal digits"
    assert server.weights_version() == version and same_outputs(probe(client), before)
    assert not [p for p in server_work_dir.iterdir() if p.name.startswith("staging-")]


def test_parse_blake3_digest():
    assert parse_blake3(f" {'AB' * 32} ") == "ab" * 32
    for bad in ["", "ab" * 31, "ab" * 33, "zz" * 32, f"{MiB}:{'ab' * 32}"]:
        with pytest.raises(ApiError, match="X-Weights-BLAKE3 must be 64 hexadecimal digits"):
            parse_blake3(bad)


def test_parse_chunked_digest():
    assert parse_chunked_sha256(f" 1048576 : {'AB' * 32} ") == (MiB, "ab" * 32)
    assert parse_chunked_sha256(f"{1 << 30}:{'0' * 64}")[0] == 1 << 30
    for bad in ["", ":", f"1048576{'0' * 64}", f"-1048576:{'0' * 64}", f"1e6:{'0' * 64}", f"²:{'0' * 64}"]:
        with pytest.raises(ApiError, match="X-Weights-Chunked-SHA256"):
            parse_chunked_sha256(bad)


# --- the server's staging in memory (WeightStore, no engine) ---------------------------------------------
def _chunks(data: bytes, size: int = 1 << 16, fail_after: int | None = None):
    async def gen():
        for start in range(0, len(data), size):
            if fail_after is not None and start >= fail_after:
                raise ClientDisconnect()
            yield data[start : start + size]

    return gen()


@pytest.fixture
def store(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    s = WeightStore(model, None, max_upload_bytes=1 << 30)
    yield s
    s.close()


def _receive(store: WeightStore, data: bytes, **kwargs) -> tuple[Path, int]:
    sha = hashlib.sha256(data).hexdigest()
    return asyncio.run(store.receive(_chunks(data, **kwargs), len(data), sha))


def test_pushes_are_staged_in_memory_and_freed(store, tmp_path):
    if store.memory_root is None:
        pytest.skip("no writable /dev/shm")
    root = store.memory_root
    assert root.parent == Path("/dev/shm") and root.name.startswith(MEMORY_ROOT_PREFIX)
    data = os.urandom(20 << 20)  # more than two write batches
    staged, size = _receive(store, data)
    assert staged.parent == root and size == len(data)
    assert (staged / "model.safetensors").read_bytes() == data
    first = store.prepare(staged, 1)
    store.promote(first)

    with pytest.raises(ClientDisconnect):  # broken off: its staging folder goes at once
        _receive(store, data, fail_after=9 << 20)
    with pytest.raises(ApiError, match="SHA-256 mismatch"):
        asyncio.run(store.receive(_chunks(data), len(data), hashlib.sha256(b"x").hexdigest()))
    assert [p.name for p in root.iterdir()] == ["served-v1"]

    second = store.prepare(_receive(store, data[:1000])[0], 2)
    store.promote(second)  # the copy served before is freed
    assert [p.name for p in root.iterdir()] == ["served-v2"] and store.served_dir == second
    store.close()
    assert not root.exists()


def test_store_checks_the_chunked_digest_as_chunks_arrive(store):
    data = os.urandom(5 * MiB + 3)
    chunked = reference_chunked_sha256(data, MiB)
    staged, size = asyncio.run(store.receive(_chunks(data, size=100_003), len(data), None, chunked))
    assert size == len(data) and (staged / "model.safetensors").read_bytes() == data
    sha = hashlib.sha256(data).hexdigest()
    assert asyncio.run(store.receive(_chunks(data), len(data), sha, chunked))[1] == len(data)  # both
    store.discard(staged)

    parent = staged.parent
    before = sorted(parent.iterdir())
    wrong = bytearray(data)
    wrong[-1] ^= 1  # the last, shorter chunk
    with pytest.raises(ApiError, match="chunked SHA-256 mismatch"):
        asyncio.run(store.receive(_chunks(bytes(wrong)), len(data), None, chunked))
    with pytest.raises(ApiError, match="chunked SHA-256 mismatch"):  # the plain digest passes, not this one
        asyncio.run(
            store.receive(_chunks(bytes(wrong)), len(data), hashlib.sha256(wrong).hexdigest(), chunked)
        )
    with pytest.raises(ApiError, match="chunked SHA-256 mismatch"):  # same chunks, one more byte
        asyncio.run(store.receive(_chunks(data + b"x"), None, None, chunked))
    with pytest.raises(ClientDisconnect):  # broken off mid-chunk
        asyncio.run(store.receive(_chunks(data, fail_after=3 * MiB + 5), len(data), None, chunked))
    assert sorted(parent.iterdir()) == before  # no staging folder left
    empty = reference_chunked_sha256(b"", MiB)
    assert asyncio.run(store.receive(_chunks(b""), 0, None, empty))[1] == 0


def receive_digests(data: bytes) -> dict[str, str]:
    """``WeightStore.receive``'s three digest arguments for ``data``."""
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "chunked_sha256": reference_chunked_sha256(data, MiB),
        "blake3": b3(data),
    }


MISMATCH = {
    "sha256": "SHA-256 mismatch",
    "chunked_sha256": "chunked SHA-256 mismatch",
    "blake3": "BLAKE3 mismatch",
}


def test_store_checks_every_digest_given(store):
    data = os.urandom(5 * MiB + 3)
    right = receive_digests(data)
    staged, size = asyncio.run(
        store.receive(_chunks(data, size=100_003), len(data), None, blake3=right["blake3"])
    )
    assert size == len(data) and (staged / "model.safetensors").read_bytes() == data
    store.discard(staged)
    staged, size = asyncio.run(store.receive(_chunks(data), len(data), **right))  # all three
    store.discard(staged)

    parent = staged.parent
    before = sorted(parent.iterdir())
    wrong = bytearray(data)
    wrong[-1] ^= 1
    for name in right:  # the other two are right for the bytes sent: this one alone refuses them
        digests = receive_digests(bytes(wrong)) | {name: right[name]}
        with pytest.raises(ApiError, match=f"^{MISMATCH[name]}"):
            asyncio.run(store.receive(_chunks(bytes(wrong)), len(data), **digests))
    with pytest.raises(ApiError, match="BLAKE3 mismatch"):  # one more byte
        asyncio.run(store.receive(_chunks(data + b"x"), None, None, blake3=right["blake3"]))
    with pytest.raises(ClientDisconnect):  # broken off
        asyncio.run(store.receive(_chunks(data, fail_after=3 * MiB), len(data), None, blake3=right["blake3"]))
    assert sorted(parent.iterdir()) == before  # no staging folder left
    assert asyncio.run(store.receive(_chunks(b""), 0, None, blake3=b3(b"")))[1] == 0


def test_pushes_go_to_disk_when_memory_has_no_room(store, monkeypatch):
    monkeypatch.setattr(store, "memory_room", lambda: 1000)
    staged, _ = _receive(store, b"x" * 900)  # 900 + a quarter does not fit in 1000
    assert staged.parent == store.work_dir
    assert store.new_staging_dir(None).parent == store.work_dir  # size unknown: disk
    monkeypatch.setattr(store, "memory_room", lambda: 10_000)
    if store.memory_root is not None:
        assert _receive(store, b"x" * 900)[0].parent == store.memory_root


def test_an_explicit_work_dir_keeps_everything_there(tmp_path):
    store = WeightStore(tmp_path / "model", tmp_path / "work", max_upload_bytes=1 << 20)
    assert store.memory_root is None
    assert _receive(store, b"abc")[0].parent == tmp_path / "work"
    assert _receive(store, b"")[0].parent == tmp_path / "work"
    store.close()


def test_memory_folders_of_dead_servers_are_swept(tmp_path):
    shm = tmp_path / "shm"  # stands for /dev/shm
    shm.mkdir()
    (shm / f"{MEMORY_ROOT_PREFIX}dead").mkdir()  # its server is gone: nobody holds the lock
    (shm / f"{MEMORY_ROOT_PREFIX}dead" / "served-v3").mkdir()
    alive = shm / f"{MEMORY_ROOT_PREFIX}alive"
    alive.mkdir()
    lock = os.open(alive, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a live server holds it
    (shm / "other").mkdir()
    try:
        store = WeightStore(tmp_path / "model", None, max_upload_bytes=1 << 20, memory_dir=shm)
        names = sorted(p.name for p in shm.iterdir())
        assert names == sorted([f"{MEMORY_ROOT_PREFIX}alive", "other", store.memory_root.name])
        store.close()
        assert sorted(p.name for p in shm.iterdir()) == sorted([f"{MEMORY_ROOT_PREFIX}alive", "other"])
    finally:
        os.close(lock)
