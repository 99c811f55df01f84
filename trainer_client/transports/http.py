"""``push: http``: the weights as one safetensors body in ``PUT /weights`` (works wherever the URL does).

The body is streamed from the snapshot's own memory (no file, no second copy), and its SHA-256, which the
server checks and which must go in a header before the body, is computed while the snapshot is taken: a
thread hashes each tensor as soon as it is copied, in body order, so hashing overlaps the copying and the
training thread never waits for it; ``push`` waits for the digest if it is not ready yet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from trainer_client.client import (
    GeneratorClient,
    SafetensorsBody,
    StaleVersionError,
    safetensors_dtype,
    safetensors_layout,
    tensor_bytes,
)
from trainer_client.transports.base import host_snapshot, served_dtype


@dataclass
class HttpSnapshot:
    """A host copy of the policy in the served dtypes, as the safetensors body a push sends."""

    body: SafetensorsBody
    sha256: Future[str]
    """SHA-256 of the body, being computed in the transport's hashing thread."""


class HttpTransport:
    name = "http"
    max_pending = 2

    def __init__(self, client: GeneratorClient):
        self.client = client
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-sha256")
        """One thread: the tasks of one body (and of successive snapshots) run in the order submitted."""

    def snapshot(self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str]) -> HttpSnapshot:
        specs = {
            name: (safetensors_dtype(served_dtype(tensors[name], served)), tuple(tensors[name].shape))
            for name, served in dtypes.items()
        }
        head, order = safetensors_layout(specs)  # known before any copy: the body's order is the copy order
        digest = hashlib.sha256()
        self._hasher.submit(digest.update, head)
        copies = {}
        for name in order:
            copies[name] = host_snapshot({name: tensors[name]}, {name: dtypes[name]})[name].contiguous()
            self._hasher.submit(digest.update, tensor_bytes(copies[name]))
        sha256 = self._hasher.submit(digest.hexdigest)
        body = SafetensorsBody(copies)  # views of the same memory the thread hashes
        assert body.head == head and body.order == order
        return HttpSnapshot(body, sha256)

    def push(self, snapshot: HttpSnapshot | Mapping[str, torch.Tensor], version: int) -> dict:
        try:
            if isinstance(snapshot, HttpSnapshot):
                body, sha256 = snapshot.body, snapshot.sha256.result()
                return self.client.push_body(body, version, sha256=sha256).model_dump()
            return self.client.push_weights(snapshot, version).model_dump()
        except StaleVersionError:
            # A retried PUT whose first attempt did land answers 409; that is success.
            if self.client.health().weights_version == version:
                return {"weights_version": version}
            raise

    def close(self) -> None:
        self._hasher.shutdown(wait=False, cancel_futures=True)
