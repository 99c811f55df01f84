"""The trainer pushes its weights in the dtype the server serves (GET /weights), not in its own fp32.

Unit level: ``host_snapshot`` on a real tiny state dict, then the bytes the http and shared transports
send, caught by a FAKE transport (httpx.MockTransport, no server) for ``PUT /weights`` and read from the
shared folder for ``POST /weights/load``. A bf16 server is not started here; the e2e tests push to a real
fp32 server."""

import json

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from trainer_client.client import GeneratorClient
from trainer_client.transports.base import host_snapshot

SERVED = {"w": "bfloat16", "b": "bfloat16", "ids": "int64"}


def state_dict() -> dict[str, torch.Tensor]:
    return {
        "w": torch.linspace(-1, 1, 12).view(3, 4),
        "b": torch.ones(4, dtype=torch.float32),
        "ids": torch.arange(5),
        "not_served": torch.zeros(2),
    }


def test_snapshot_casts_floats_to_the_served_dtype_and_keeps_the_rest():
    sd = state_dict()
    snap = host_snapshot(sd, SERVED)
    assert set(snap) == set(SERVED)  # only what the server serves
    assert snap["w"].dtype == torch.bfloat16 and snap["b"].dtype == torch.bfloat16
    assert snap["ids"].dtype == torch.int64 and snap["ids"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(snap["w"], sd["w"].to(torch.bfloat16))
    sd["ids"] += 1  # a copy: the optimizer stepping the policy does not change a pending push
    assert snap["ids"].tolist() == [0, 1, 2, 3, 4] and snap["ids"].data_ptr() != sd["ids"].data_ptr()


def test_snapshot_for_an_fp32_server_is_an_fp32_copy():
    sd = state_dict()
    snap = host_snapshot(sd, {"w": "float32", "ids": "int64"})
    assert snap["w"].dtype == torch.float32 and torch.equal(snap["w"], sd["w"])
    assert snap["w"].data_ptr() != sd["w"].data_ptr()


def fake_server(got: dict):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/weights":
            got["put"] = b"".join(request.stream)
        else:
            got["load"] = json.loads(request.content)["path"]
        return httpx.Response(200, json={"weights_version": 1, "bytes": 0, "load_seconds": 0.0})

    return GeneratorClient("http://fake", transport=httpx.MockTransport(handler))


def dtypes_in(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_slice(n).get_dtype() for n in f.keys()}


@pytest.mark.parametrize("shared", [False, True])
def test_pushed_file_carries_the_served_dtype(tmp_path, shared):
    got = {}
    if shared:
        from trainer_client.transports.shared import SharedFolderTransport as Transport

        transport = Transport(fake_server(got), str(tmp_path), "/srv")
    else:
        from trainer_client.transports.http import HttpTransport

        transport = HttpTransport(fake_server(got))
    transport.push(host_snapshot(state_dict(), SERVED), version=1)
    if shared:
        assert got["load"] == "/srv/weights-v00000001.safetensors"
        path = tmp_path / "weights-v00000001.safetensors"
        assert dtypes_in(path) == {"w": "BF16", "b": "BF16", "ids": "I64"}
    else:
        tensors = load(got["put"])
        assert {n: t.dtype for n, t in tensors.items()} == {
            "w": torch.bfloat16, "b": torch.bfloat16, "ids": torch.int64,
        }  # fmt: skip
        assert torch.equal(tensors["w"], state_dict()["w"].to(torch.bfloat16))
