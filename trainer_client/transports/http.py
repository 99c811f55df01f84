"""``push: http``: the weights as one safetensors body in ``PUT /weights`` (works wherever the URL does).

The body is streamed from the snapshot's own memory (no file, no second copy), and its digest, which the
server checks and which must go in a header before the body, is computed while the snapshot is taken: the
``X-Weights-Chunked-SHA256`` of the body (:class:`~trainer_client.client.ChunkedSha256`), each chunk hashed
by a pool of threads as soon as the tensors it spans are copied, so the chunks hash in parallel, overlapping
the copying, and the training thread never waits for them; ``push`` waits for the digest if it is not
ready yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from trainer_client.client import (
    HASH_THREADS,
    ChunkedSha256,
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
    digest: ChunkedSha256
    """The body's ``X-Weights-Chunked-SHA256``, its chunks being hashed in the transport's threads."""


class HttpTransport:
    name = "http"
    max_pending = 2

    def __init__(self, client: GeneratorClient, threads: int = HASH_THREADS):
        self.client = client
        self._hasher = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="push-sha256")

    def snapshot(self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str]) -> HttpSnapshot:
        digest = ChunkedSha256(self._hasher)
        if getattr(tensors, "gathers_on_read", False):
            # A sharded learner's tensors (distributed.FullTensors): each read of another bucket gathers it
            # on every rank, so read once, in the buckets' order, and hash once everything is copied.
            names = [n for n in tensors if n in dtypes] + [n for n in dtypes if n not in tensors]
            copies = {name: self._copy(tensors, name, dtypes[name]) for name in names}
            head, order = safetensors_layout(
                {n: (safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in copies.items()}
            )
            digest.add(head)
            for name in order:
                digest.add(tensor_bytes(copies[name]))
        else:
            specs = {}
            for name, served in dtypes.items():
                t = tensors[name]
                specs[name] = (safetensors_dtype(served_dtype(t, served)), tuple(t.shape))
            # the layout is known before any copy, so the chunks are hashed while the next tensors copy
            head, order = safetensors_layout(specs)
            digest.add(head)
            copies = {}
            for name in order:
                copies[name] = self._copy(tensors, name, dtypes[name])
                digest.add(tensor_bytes(copies[name]))  # hashes the chunks this copy completes
        digest.close()
        body = SafetensorsBody(copies)  # views of the same memory the threads hash
        assert body.head == head and body.order == order
        return HttpSnapshot(body, digest)

    @staticmethod
    def _copy(tensors: Mapping[str, torch.Tensor], name: str, served: str) -> torch.Tensor:
        return host_snapshot({name: tensors[name]}, {name: served})[name].contiguous()

    def push(self, snapshot: HttpSnapshot | Mapping[str, torch.Tensor], version: int) -> dict:
        try:
            if isinstance(snapshot, HttpSnapshot):
                body, digest = snapshot.body, snapshot.digest.result()
                return self.client.push_body(body, version, chunked_sha256=digest).model_dump()
            return self.client.push_weights(snapshot, version).model_dump()
        except StaleVersionError:
            # A retried PUT whose first attempt did land answers 409; that is success.
            if self.client.health().weights_version == version:
                return {"weights_version": version}
            raise

    def close(self) -> None:
        self._hasher.shutdown(wait=False, cancel_futures=True)
