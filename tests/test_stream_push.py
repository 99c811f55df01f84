"""Stream uploads: the body of a push on the server's raw TCP port (``--stream-port``), against the real
server (the shared one has a stream port).

What a user relies on: a stream push serves exactly the weights a ``PUT /weights`` of the same file serves;
anything short of a whole, matching body (cut half-way, too long, a wrong digest, silence, a wrong ticket)
is refused with a clear answer and leaves the version served before in place, its staging cleaned up; and a
trainer whose ``push: auto`` cannot reach the port sends by ``PUT /weights`` instead.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import blake3
import httpx
import pytest
from conftest import API_KEY, TRANSFER_TIMEOUT, probe, same_weights
from safetensors.torch import load_file

from generator_server.weights import SPARE_FILE, WeightStore
from trainer_client.backends import ServerBackend
from trainer_client.client import GeneratorClient, GeneratorHTTPError
from trainer_client.transports.stream import StreamTransport


def next_version(client: httpx.Client) -> int:
    return client.get("/weights").json()["weights_version"] + 1


def begin(client: httpx.Client, version: int, body: bytes, digest: str | None = None) -> dict:
    """Open a stream upload of ``body``, announcing its BLAKE3 (or ``digest``) at once."""
    r = client.post(
        "/weights/stream/begin",
        json={"version": version, "bytes": len(body), "blake3": digest or blake3.blake3(body).hexdigest()},
    )
    assert r.status_code == 200, r.text
    return r.json()


def send(server_url: str, begun: dict, data: bytes, ticket: bytes | None = None) -> None:
    """Connect to the stream port, write the ticket and ``data``, close (a server that closes the
    connection first, as it does on a bad ticket or too many bytes, ends the sending)."""
    host = httpx.URL(server_url).host
    with socket.create_connection((host, begun["port"]), timeout=30) as conn:
        try:
            conn.sendall(ticket if ticket is not None else bytes.fromhex(begun["ticket"]))
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # until the server closes its side: it has read everything it takes
        except OSError:  # reset, broken pipe, not connected
            pass


def staging_is_tidy(work_dir: Path, timeout: float = 10.0) -> bool:
    """Nothing left but the served copy (a refused upload's staging folder is gone)."""
    deadline = time.monotonic() + timeout
    while any(p.name.startswith("staging-") for p in work_dir.iterdir()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_superseded_weights_file_is_written_over_by_the_next_stream_upload(tmp_path):
    """With a stream port, the weights file of a version superseded in memory is kept (its pages are in
    place) and the next stream upload writes over it, made exactly its own size, through the mapping its
    own upload left when the size is the same; anything else that stages deletes it, and closes that
    mapping (which would hold the deleted file's memory); without a stream port none is kept."""
    (tmp_path / "model").mkdir()
    store = WeightStore(tmp_path / "model", None, max_upload_bytes=1 << 30)
    if store.memory_root is None:
        pytest.skip("no writable /dev/shm")
    root, spare = store.memory_root, store.memory_root / SPARE_FILE
    uploads = {}
    try:

        def serve(version: int, body: bytes) -> None:
            staged = store.new_staging_dir(len(body), recycle=True)
            upload = uploads[version] = store.open_upload(staged / "model.safetensors", len(body))
            upload.map[:] = body
            assert (staged / "model.safetensors").read_bytes() == body
            store.promote(store.prepare(staged, version))
            store.keep_upload(upload)

        store.keep_spare = True
        serve(1, b"a" * 5000)  # supersedes the model folder: nothing to keep
        assert not spare.exists()
        serve(2, b"b" * 7000)
        assert spare.read_bytes() == b"a" * 5000
        inode = spare.stat().st_ino
        serve(3, b"c" * 3000)  # written over version 1's file, cut to its own size
        assert (root / "served-v3" / "model.safetensors").stat().st_ino == inode
        assert uploads[1].map.closed and not uploads[2].map.closed  # (2 is the spare now)
        assert spare.read_bytes() == b"b" * 7000
        serve(4, b"d" * 9000)  # longer than the file it writes over
        assert (root / "served-v4" / "model.safetensors").read_bytes() == b"d" * 9000
        serve(5, b"e" * 3000)  # as long as version 3's file: through the mapping version 3 left
        assert uploads[5] is uploads[3] and spare.read_bytes() == b"d" * 9000
        assert (root / "served-v5" / "model.safetensors").read_bytes() == b"e" * 3000
        assert sorted(p.name for p in root.iterdir()) == ["served-v5", SPARE_FILE]
        store.discard(store.new_staging_dir(100))  # a PUT /weights or a load: the spare goes
        assert not spare.exists() and uploads[4].map.closed and not uploads[5].map.closed

        store.keep_spare = False
        serve(6, b"f" * 100)
        assert sorted(p.name for p in root.iterdir()) == ["served-v6"]
        assert uploads[5].map.closed
    finally:
        store.close()
    assert all(u.map.closed for u in uploads.values())


def test_stream_push_serves_what_put_serves(server, client, make_weights):
    """``StreamTransport`` (what ``push: auto`` picks here) serves the very weights a PUT of the same file
    serves, and says how long the server took to receive them."""
    path = make_weights(seed=71)
    before = probe(client)
    version = next_version(client)
    with GeneratorClient(server.url, api_key=API_KEY, timeout=120, max_retries=0) as gen:
        transport = StreamTransport(gen)
        dtypes = {name: spec.dtype for name, spec in gen.weights_spec().tensors.items()}
        try:
            out = transport.push(transport.snapshot(load_file(path), dtypes), version)
        finally:
            transport.close()
    assert out["weights_version"] == version and out["receive_seconds"] > 0
    streamed = probe(client)
    assert streamed["weights_version"] == version and not same_weights(streamed, before)
    assert server.push(path, version + 1).status_code == 200  # the reference: the same file over PUT
    assert same_weights(probe(client), streamed)


def test_stream_pushes_in_a_row_each_serve_their_own_weights(server, client, make_weights):
    """Stream uploads write over the two files the server alternates between, and the engine's worker loads
    each file again and again (on a GPU from page-locked memory once a file comes back,
    ``generator_server/mapped_weights.py``): every push still serves its own weights, never a file's
    earlier ones. Weights A, B, A, B, C: the third and fourth answer as the first and second, the fifth as
    a ``PUT /weights`` of C."""
    seeds = [81, 82, 81, 82, 83]
    paths = {seed: make_weights(seed=seed) for seed in set(seeds)}
    answers = []
    with GeneratorClient(server.url, api_key=API_KEY, timeout=120, max_retries=0) as gen:
        transport = StreamTransport(gen)
        dtypes = {name: spec.dtype for name, spec in gen.weights_spec().tensors.items()}
        try:
            for seed in seeds:
                version = next_version(client)
                transport.push(transport.snapshot(load_file(paths[seed]), dtypes), version)
                answers.append(probe(client))
                assert answers[-1]["weights_version"] == version
        finally:
            transport.close()
    assert not same_weights(answers[0], answers[1])
    assert same_weights(answers[2], answers[0]) and same_weights(answers[3], answers[1])
    assert not same_weights(answers[4], answers[0]) and not same_weights(answers[4], answers[1])
    assert server.push(paths[83], next_version(client)).status_code == 200
    assert same_weights(probe(client), answers[4])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cut", "ended after"),
        ("long", "more than the"),
        ("digest", "BLAKE3 mismatch"),
        ("commit digest", "BLAKE3 mismatch"),
        ("two digests", "is not the one begin announced"),
        ("no digest", "give it in begin or in commit"),
    ],
)
def test_a_broken_upload_is_refused_and_changes_nothing(
    case, message, server, client, make_weights, server_work_dir
):
    body = make_weights(seed=72).read_bytes()
    before = probe(client)
    version = next_version(client)
    commit = None  # the commit's body
    if case == "cut":  # the sender dies half-way
        begun = begin(client, version, body)
        send(server.url, begun, body[: len(body) // 2])
    elif case == "long":
        begun = begin(client, version, body[:-1])
        send(server.url, begun, body)
    elif case == "digest":
        begun = begin(client, version, body, digest="0" * 64)
        send(server.url, begun, body)
    elif case == "two digests":  # the right one at begin, another at the commit
        begun = begin(client, version, body)
        send(server.url, begun, body)
        commit = {"blake3": "1" * 64}
    else:  # the digest only at the commit (as StreamTransport sends it): a wrong one, or none at all
        r = client.post("/weights/stream/begin", json={"version": version, "bytes": len(body)})
        assert r.status_code == 200, r.text
        begun = r.json()
        send(server.url, begun, body)
        commit = {"blake3": "0" * 64} if case == "commit digest" else None
    r = client.post(f"/weights/stream/{begun['session']}/commit", json=commit)
    assert r.status_code == 400 and message in r.json()["detail"], r.text
    after = probe(client)
    assert after["weights_version"] == version - 1 and same_weights(after, before)
    assert staging_is_tidy(server_work_dir)


def test_a_wrong_ticket_is_turned_away_and_the_right_one_still_works(server, client, make_weights):
    body = make_weights(seed=73).read_bytes()
    version = next_version(client)
    begun = begin(client, version, body)
    send(server.url, begun, body, ticket=bytes(32))  # not this session's ticket: closed, nothing taken
    send(server.url, begun, body)
    r = client.post(f"/weights/stream/{begun['session']}/commit")
    assert r.status_code == 200, r.text
    assert r.json()["weights_version"] == version


def test_a_used_ticket_cannot_send_again(server, client, make_weights):
    body = make_weights(seed=74).read_bytes()
    version = next_version(client)
    begun = begin(client, version, body)
    send(server.url, begun, body)
    send(server.url, begun, b"x" * 64)  # a second connection with the same ticket is turned away
    r = client.post(f"/weights/stream/{begun['session']}/commit")
    assert r.status_code == 200 and r.json()["weights_version"] == version, r.text


def test_silence_ends_the_session(server, client, make_weights, server_work_dir):
    """A session whose body never comes is dropped after --transfer-timeout; its commit then says so."""
    body = make_weights(seed=75).read_bytes()
    version = next_version(client)
    begun = begin(client, version, body)
    time.sleep(TRANSFER_TIMEOUT + 1.5)
    r = client.post(f"/weights/stream/{begun['session']}/commit")
    assert r.status_code == 404 and "timed out" in r.json()["detail"]
    assert client.get("/weights").json()["weights_version"] == version - 1
    assert staging_is_tidy(server_work_dir)


def test_begin_refuses_what_it_can_see_at_once(server, client):
    version = next_version(client)
    body = {"version": version - 1, "bytes": 1000, "blake3": "0" * 64}
    r = client.post("/weights/stream/begin", json=body)
    assert r.status_code == 409 and "not greater than the served version" in r.json()["detail"]
    r = client.post("/weights/stream/begin", json={**body, "version": version, "bytes": 2**50})
    assert r.status_code == 413 and "--max-upload-bytes" in r.json()["detail"]
    r = client.post("/weights/stream/begin", json={**body, "version": version, "blake3": "xyz"})
    assert r.status_code == 400 and "X-Weights-BLAKE3" in r.json()["detail"]
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.post("/weights/stream/begin", json=body).status_code == 401
    assert client.get("/weights").json()["weights_version"] == version - 1


def test_every_wait_ends(server, client, make_weights, server_work_dir):
    """A commit waiting for a body that stops coming (the connection left open) gets 408 after
    --transfer-timeout, and a connection that never sends its ticket is closed after as long."""
    body = make_weights(seed=77).read_bytes()
    version = next_version(client)
    begun = begin(client, version, body)
    host = httpx.URL(server.url).host
    with (
        socket.create_connection((host, begun["port"]), timeout=30) as stalled,
        socket.create_connection((host, begun["port"]), timeout=30) as silent,
    ):
        stalled.sendall(bytes.fromhex(begun["ticket"]) + body[:1000])
        started = time.monotonic()
        r = client.post(f"/weights/stream/{begun['session']}/commit", timeout=TRANSFER_TIMEOUT * 4)
        assert r.status_code == 408 and "nothing arrived" in r.json()["detail"], r.text
        assert time.monotonic() - started < TRANSFER_TIMEOUT * 3
        silent.settimeout(TRANSFER_TIMEOUT * 2)
        assert silent.recv(1) == b""  # closed by the server
    assert client.get("/weights").json()["weights_version"] == version - 1
    assert staging_is_tidy(server_work_dir)


def unreachable_port(real_begin):
    """``stream_begin`` answering with a port nobody listens on (a port not published, a firewall)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    return lambda *a, **k: {**real_begin(*a, **k), "port": dead_port}


def refused(real_begin):
    """``stream_begin`` answering as a server without a stream port does (a restart without the flag)."""

    def refuse(*args, **kwargs):
        raise GeneratorHTTPError(400, "this server takes no stream uploads", "POST", "/weights/stream")

    return refuse


@pytest.mark.parametrize("broken_begin", [unreachable_port, refused])
def test_auto_falls_back_to_http_when_the_stream_fails(broken_begin, server, client, make_weights):
    """A stream port the trainer cannot reach costs one refused connection, and a server that refuses the
    stream one 400; either way ``push: auto`` sends the same snapshot by PUT /weights, and the run goes
    on."""
    path = make_weights(seed=76)
    version = next_version(client)
    gen = GeneratorClient(server.url, api_key=API_KEY, timeout=120, max_retries=0)
    backend = ServerBackend(gen, push="auto")
    try:
        backend.weights_spec()
        assert backend.transport.name == "stream"
        gen.stream_begin = broken_begin(gen.stream_begin)
        dtypes = {name: spec.dtype for name, spec in gen.weights_spec().tensors.items()}
        out = backend.push(backend.snapshot(load_file(path), dtypes), version)
        assert out["weights_version"] == version
        assert backend.transport.name == "http"
    finally:
        backend.close()
    assert client.get("/weights").json()["weights_version"] == version
