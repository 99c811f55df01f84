"""CUDA IPC weight transfers against the real server on a GPU (skipped without one; ``bench/run_gpu.sh
tests`` runs them on the lent H200).

The trainer side is the real ``IpcTransport`` on a real policy in this process; the server is the session's
shared server (tests/conftest.py), whose engine runs on the same GPU. What the user cares about: a pushed
version serves exactly what the same weights pushed over HTTP serve; a transfer that fails half-way (the
sender aborts, dies, or sends a bad handle) never leaves a mix of two versions served."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import API_KEY, TRANSFER_TIMEOUT, same_outputs

from trainer_client.client import GeneratorClient, GeneratorHTTPError, GeneratorUnavailable
from trainer_client.transports.http import HttpTransport
from trainer_client.transports.ipc import IpcTransport, ipc_handle, local_gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")

GREEDY = dict(
    prompts=["Once upon a time", "The answer is"], n=1, max_tokens=12, temperature=0.0, logprobs=True
)


@pytest.fixture
def trainer(server):
    with GeneratorClient(server.url, api_key=API_KEY, timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture
def weights(tiny_model_dir, server):
    """``weights(seed)``: the served model's tensors plus seeded noise, on this GPU, in the served dtypes."""
    from safetensors.torch import load_file

    base = load_file(tiny_model_dir / "model.safetensors", device="cuda")

    def make(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        return {n: t + 0.5 * torch.randn(t.shape, generator=g, device="cuda") for n, t in base.items()}

    return make


def dtypes(client: GeneratorClient) -> dict[str, str]:
    return {n: t.dtype for n, t in client.weights_spec().tensors.items()}


def manifest_of(snapshot) -> list[dict]:
    """What ``begin`` announces: every tensor's name, shape and dtype, in bucket order."""
    return [{k: t[k] for k in ("name", "shape", "dtype")} for b in snapshot for t in b.tensors]


def generate(client: GeneratorClient) -> dict:
    return client.generate(**GREEDY).model_dump()


def test_the_server_offers_ipc_on_this_gpu(trainer):
    spec = trainer.weights_spec()
    assert "ipc" in spec.transports
    assert (spec.host_id, spec.gpu_uuid) == local_gpu("cuda")


def test_an_ipc_push_serves_what_the_same_weights_pushed_over_http_serve(trainer, weights):
    w, d = weights(1), dtypes(trainer)
    http, ipc = HttpTransport(trainer), IpcTransport(trainer, bucket_bytes=256 * 1024)  # several buckets
    v = trainer.health().weights_version
    http.push(http.snapshot(w, d), v + 1)
    over_http = generate(trainer)
    http.push(http.snapshot(weights(2), d), v + 2)  # something else in between
    snapshot = ipc.snapshot(w, d)
    assert len(snapshot) > 1
    out = ipc.push(snapshot, v + 3)
    assert out["weights_version"] == v + 3 and out["load_seconds"] > 0
    over_ipc = generate(trainer)
    assert over_ipc["weights_version"] == v + 3
    over_ipc["weights_version"] = v + 1
    assert same_outputs(over_http, over_ipc)


def begin(trainer, snapshot, version: int, gpu: str | None = None) -> str:
    """``POST /weights/ipc/begin`` of ``snapshot`` from this host and GPU (or ``gpu``); the session id."""
    host, here = local_gpu("cuda")
    return trainer.ipc_begin(version, host, gpu or here, manifest_of(snapshot))


def _partial_transfer(trainer, w, d, version) -> str:
    """Begin a transfer of ``version`` and send only its first bucket; returns the session."""
    snapshot = IpcTransport(trainer, bucket_bytes=256 * 1024).snapshot(w, d)
    session = begin(trainer, snapshot, version)
    trainer.ipc_bucket(session, ipc_handle(snapshot[0].buffer), snapshot[0].tensors)
    return session


def test_an_aborted_transfer_after_an_http_push_restores_the_version_served(trainer, weights):
    d = dtypes(trainer)
    http = HttpTransport(trainer)
    v = trainer.health().weights_version
    http.push(http.snapshot(weights(3), d), v + 1)  # on the server's disk: it can go back to it
    before = generate(trainer)
    session = _partial_transfer(trainer, weights(4), d, v + 2)
    trainer.ipc_abort(session)
    assert trainer.health().weights_version == v + 1
    assert same_outputs(before, generate(trainer))


def test_a_sender_that_goes_silent_is_timed_out_and_never_half_served(trainer, weights):
    d = dtypes(trainer)
    ipc = IpcTransport(trainer)
    v = trainer.health().weights_version
    ipc.push(ipc.snapshot(weights(5), d), v + 1)  # version v+1 exists only in GPU memory
    _partial_transfer(trainer, weights(6), d, v + 2)
    time.sleep(TRANSFER_TIMEOUT + 2)  # the sender "died": nothing more arrives
    with pytest.raises(GeneratorUnavailable, match="503: a weights transfer failed half-way"):
        generate(trainer)  # 503 (no retries here) until a whole version arrives
    ipc.push(ipc.snapshot(weights(7), d), v + 2)  # a whole version ends the outage
    assert generate(trainer)["weights_version"] == v + 2


def test_a_handle_from_another_gpu_or_a_bad_handle_is_refused(trainer, weights):
    d = dtypes(trainer)
    http = HttpTransport(trainer)
    v = trainer.health().weights_version
    http.push(http.snapshot(weights(8), d), v + 1)
    before = generate(trainer)
    snapshot = IpcTransport(trainer).snapshot(weights(9), d)
    with pytest.raises(GeneratorHTTPError, match="another GPU|lives on GPU|GPU-elsewhere") as e:
        begin(trainer, snapshot, v + 2, gpu="GPU-elsewhere")
    assert e.value.status_code == 400
    session = begin(trainer, snapshot, v + 2)
    bad = ipc_handle(snapshot[0].buffer)
    bad["storage_handle"] = "AAAA" + bad["storage_handle"][4:]
    with pytest.raises(GeneratorHTTPError) as e:
        trainer.ipc_bucket(session, bad, snapshot[0].tensors)
    assert e.value.status_code in (400, 500)
    assert trainer.health().weights_version == v + 1
    assert same_outputs(before, generate(trainer))


def test_a_transfer_aborted_before_its_first_bucket_leaves_the_served_version_as_it_was(trainer, weights):
    d = dtypes(trainer)
    ipc = IpcTransport(trainer)
    v = trainer.health().weights_version
    ipc.push(ipc.snapshot(weights(10), d), v + 1)  # in GPU memory only: no disk copy to go back to
    before = generate(trainer)
    snapshot = ipc.snapshot(weights(11), d)
    trainer.ipc_abort(begin(trainer, snapshot, v + 2))
    assert same_outputs(before, generate(trainer))  # no 503: nothing had changed
