"""The weight-transport seam: what the server offers, how the trainer picks, and the refusals.

CUDA IPC itself needs a GPU (``bench/run_gpu.sh`` runs ``tests/gpu/test_ipc.py`` there); on the CPU the
tests check everything around it: the server's advertisement in ``GET /weights``, the trainer's choice for
``push: auto``, clear refusals of ``ipc`` by a CPU server (HTTP 400, nothing changed), the packing of
tensors into IPC buckets, and the server's checks of a bucket against its session's manifest."""

from __future__ import annotations

import pytest
import torch
from conftest import API_KEY, ON_GPU

from generator_server.engine import host_id as server_host_id
from generator_server.errors import ApiError
from generator_server.ipc import IpcSession, _check_bucket
from generator_server.schemas import IpcBucketRequest
from generator_server.weights import TensorInfo
from trainer_client.client import GeneratorClient, PushTarget
from trainer_client.config import TrainConfig
from trainer_client.train import run_training
from trainer_client.transports import TransportError, choose_transport
from trainer_client.transports.ipc import ALIGN, bucket_tensors, host_id, pack_buckets


def test_cpu_server_offers_http_and_shared_and_says_where_it_runs(client):
    spec = client.get("/weights").json()
    # the shared server has a --checkpoint-root; CUDA IPC is offered by an engine on a GPU only
    assert spec["transports"] == ["http", "shared"] + (["ipc"] if ON_GPU else []) + ["stream"]
    assert isinstance(spec["stream_port"], int) and spec["stream_port"] > 0
    assert spec["digests"] == ["blake3", "chunked-sha256", "sha256"]  # the PUT /weights digests, best first
    assert (spec["gpu_uuid"] is None) == (not ON_GPU)
    assert spec["host_id"] == host_id() == server_host_id()  # same machine, as the trainer sees it


def test_auto_picks_http_for_a_cpu_trainer_or_another_gpu():
    here = PushTarget(transports=["http", "ipc"], host_id=host_id(), gpu_uuid="GPU-elsewhere")
    assert choose_transport("auto", here, "cpu") == "http"
    assert choose_transport("auto", PushTarget(), "cpu") == "http"  # an older server says nothing: http
    assert choose_transport("http", here, "cpu") == "http"


def test_auto_picks_the_stream_port_when_the_server_has_one():
    streaming = PushTarget(transports=["http", "stream"], stream_port=9000)
    assert choose_transport("auto", streaming, "cpu") == "stream"
    assert choose_transport("http", streaming, "cpu") == "http"  # asked for by name: as asked
    with pytest.raises(TransportError, match="--stream-port"):
        choose_transport("stream", PushTarget(), "cpu")


@pytest.mark.parametrize(
    ("requested", "target", "message"),
    [
        ("ipc", PushTarget(transports=["http"]), "not offered by the server.*CUDA IPC needs"),
        ("shared", PushTarget(transports=["http"]), "--checkpoint-root"),
        ("ipc", PushTarget(transports=["http", "ipc"], host_id="x", gpu_uuid="y"), "CUDA device, not cpu"),
    ],
)
def test_a_transport_the_server_cannot_take_is_refused_with_the_reason(requested, target, message):
    with pytest.raises(TransportError, match=message):
        choose_transport(requested, target, "cpu")


@pytest.mark.skipif(ON_GPU, reason="the server's engine is on a GPU")
def test_ipc_begin_on_a_cpu_server_is_a_clear_400_and_changes_nothing(client):
    before = client.get("/weights").json()
    tensors = [{"name": n, "shape": t["shape"], "dtype": t["dtype"]} for n, t in before["tensors"].items()]
    body = {
        "version": before["weights_version"] + 1,
        "host_id": host_id(),
        "gpu_uuid": "GPU-0",
        "tensors": tensors,
    }
    r = client.post("/weights/ipc/begin", json=body)
    assert r.status_code == 400
    assert "does not take CUDA IPC" in r.json()["detail"] and "use push: http" in r.json()["detail"]
    assert client.get("/weights").json()["weights_version"] == before["weights_version"]


def test_ipc_endpoints_need_the_api_key_and_an_open_session(server, client):
    with httpx_client(server.url) as anonymous:
        assert anonymous.post("/weights/ipc/begin", json={}).status_code == 401
    r = client.post("/weights/ipc/nosuchsession/commit")
    assert r.status_code == 404 and "no open IPC transfer session" in r.json()["detail"]


def httpx_client(url):
    import httpx

    return httpx.Client(base_url=url, timeout=30)


def test_trainer_with_push_ipc_against_a_cpu_server_stops_at_start_with_the_reason(
    server, tiny_model_dir, length_task, tmp_path
):
    config = TrainConfig(
        model=str(tiny_model_dir), server_url=server.url, api_key=API_KEY, task=str(length_task),
        reward="length", steps=1, push="ipc", progress_bar=False, output_dir=str(tmp_path),
    )  # fmt: skip
    with GeneratorClient(server.url, api_key=API_KEY) as c:
        version = c.health().weights_version
    reason = "needs the trainer on a CUDA device" if ON_GPU else "push: ipc is not offered"
    with pytest.raises(TransportError, match=reason):
        run_training(config)
    with GeneratorClient(server.url, api_key=API_KEY) as c:
        assert c.health().weights_version == version  # nothing was pushed


# --- packing into IPC buckets (on CPU tensors: the same code runs on the GPU) ----------------------------
def test_buckets_hold_each_tensor_cast_to_the_served_dtype_and_respect_the_size():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embed": torch.randn(64, 32, generator=g),  # 4 KiB in bf16
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g),
        "ids": torch.arange(6),
        "huge": torch.randn(100, 64, generator=g),  # larger than a bucket: a bucket of its own
    }
    dtypes = {"embed": "bfloat16", "a": "bfloat16", "b": "float32", "ids": "int64", "huge": "bfloat16"}
    buckets = pack_buckets(tensors, dtypes, bucket_bytes=5000)
    for bucket in buckets:
        assert bucket.buffer.dtype == torch.uint8 and bucket.buffer.dim() == 1
        assert bucket.buffer.numel() <= 5000 or len(bucket.tensors) == 1
        assert all(t["offset"] % ALIGN == 0 for t in bucket.tensors)
    seen = bucket_tensors(buckets)
    assert list(seen) == list(dtypes)  # every tensor once, in order
    for name, value in seen.items():
        expected = tensors[name].to(value.dtype)
        assert value.dtype == (torch.int64 if name == "ids" else getattr(torch, dtypes[name]))
        assert torch.equal(value, expected)
    tensors["a"] += 1  # the buckets are copies: training on does not change a pending push
    assert torch.equal(seen["a"], (tensors["a"] - 1).to(torch.bfloat16))


# --- the server's checks of a bucket against its session's manifest -------------------------------------
def session() -> IpcSession:
    manifest = {"w": TensorInfo("BF16", (4, 4)), "b": TensorInfo("BF16", (4,))}
    return IpcSession("s", 1, manifest, timeout=1.0)


def bucket(tensors: list[dict], nbytes: int = 4096) -> IpcBucketRequest:
    handle = dict(
        storage_handle="", storage_size_bytes=nbytes, storage_offset_bytes=0, tensor_offset=0, nbytes=nbytes,
        ref_counter_handle="", ref_counter_offset=0,
    )  # fmt: skip
    return IpcBucketRequest(handle=handle, tensors=tensors)


def test_a_bucket_that_matches_the_manifest_passes():
    _check_bucket(session(), bucket([
        {"name": "w", "shape": [4, 4], "dtype": "bfloat16", "offset": 0},
        {"name": "b", "shape": [4], "dtype": "bfloat16", "offset": 256},
    ]))  # fmt: skip


def entry(name: str, shape: list[int], dtype: str = "bfloat16", offset: int = 0) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, "offset": offset}


@pytest.mark.parametrize(
    ("tensors", "nbytes", "message"),
    [
        ([entry("x", [4])], 4096, "not in the session's manifest"),
        ([entry("w", [2, 8])], 4096, "differs from the manifest"),
        ([entry("w", [4, 4], "float32")], 4096, "differs from the manifest"),
        ([entry("w", [4, 4]), entry("b", [4], offset=16)], 4096, "overlaps"),
        ([entry("w", [4, 4], offset=4080)], 4096, "ends past the buffer"),
        ([entry("w", [4, 4], "complex")], 4096, "torch dtype name"),
    ],
)
def test_a_bucket_that_does_not_match_is_refused_with_the_reason(tensors, nbytes, message):
    with pytest.raises(ApiError, match=message) as e:
        _check_bucket(session(), bucket(tensors, nbytes))
    assert e.value.status_code == 400


@pytest.mark.parametrize("digest", ["blake3", "chunked-sha256"])
def test_an_http_snapshot_of_a_sharded_learner_gathers_each_bucket_once_and_sends_the_same_body(digest):
    from trainer_client.distributed import FullTensors
    from trainer_client.transports.http import HttpTransport

    g = torch.Generator().manual_seed(0)
    full = {f"model.layers.{i}.w": torch.randn(3, 5, generator=g) for i in range(12)}  # 10 sorts before 2
    full["lm_head.weight"] = torch.randn(7, 5, generator=g)
    names = list(full)
    buckets = [names[i : i + 4] for i in range(0, len(names), 4)]  # the learner's order, not the body's
    fetched = []

    def fetch(bucket: list[str]) -> dict[str, torch.Tensor]:
        fetched.append(bucket)
        return {n: full[n] for n in bucket}

    dtypes = dict.fromkeys(sorted(names), "bfloat16")  # the server's order
    transport = HttpTransport(client=None, digests=[digest])
    try:
        sharded = transport.snapshot(FullTensors(buckets, fetch), dtypes)
        plain = transport.snapshot(full, dtypes)
        assert fetched == buckets  # one gather per bucket, in order
        assert b"".join(sharded.body.chunks()) == b"".join(plain.body.chunks())
        assert sharded.digest.name == plain.digest.name == digest
        assert sharded.digest.result() == plain.digest.result()
    finally:
        transport.close()
