"""``push: http``: the weights as one safetensors body in ``PUT /weights`` (works wherever the URL does).

The body is streamed from the snapshot's own memory (no file, no second copy), and its digest, which the
server checks and which must go in a header before the body, is computed while the snapshot is taken: the
safetensors header is known before the first copy, and each tensor's bytes are hashed as soon as they are
copied, in other threads, so the hashing overlaps the copying and the training thread never waits for it;
``push`` waits for the digest if it is not ready yet. The digest is the first the server lists in
``GET /weights`` (``digests``, its order of preference) that can be computed that way:

- ``X-Weights-BLAKE3`` (:class:`~trainer_client.client.Blake3Digest`), the cheapest (3.5x SHA-256's speed
  on one core): one thread feeds it the tensors in order, and BLAKE3 spreads each one over the cores;
- else ``X-Weights-Chunked-SHA256`` (:class:`~trainer_client.client.ChunkedSha256`), each 16 MiB chunk
  hashed by a pool of threads as soon as the tensors it spans are copied: what a server too old to list
  ``digests`` checks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from trainer_client.client import (
    HASH_THREADS,
    Blake3Digest,
    ChunkedSha256,
    GeneratorClient,
    GeneratorError,
    SafetensorsBody,
    StaleVersionError,
    safetensors_dtype,
    safetensors_layout,
    tensor_bytes,
)
from trainer_client.transports.base import adapter_metadata, host_snapshot, served_dtype

log = logging.getLogger(__name__)

PUSH_BODY_ARGUMENT = {"blake3": "blake3", "chunked-sha256": "chunked_sha256"}
"""The digests a snapshot can be hashed with while it is copied (names as ``GET /weights`` lists them) ->
the argument of ``GeneratorClient.push_body`` that sends it."""
FALLBACK_DIGEST = "chunked-sha256"
"""The digest of a snapshot for a server that lists none of the above (it predates ``digests``)."""


def pick_digest(offered: Sequence[str]) -> str:
    """The digest to hash a snapshot with for a server that checks ``offered`` (preferred first)."""
    return next((d for d in offered if d in PUSH_BODY_ARGUMENT), FALLBACK_DIGEST)


@dataclass
class HttpSnapshot:
    """A host copy of the policy in the served dtypes, as the safetensors body a push sends."""

    body: SafetensorsBody
    digest: Blake3Digest | ChunkedSha256
    """The body's digest (``digest.name`` says which), being computed in the transport's threads."""
    adapter: bool = False
    """A LoRA adapter's tensors (its config in the body's metadata), pushed with ``adapter=true``."""


class HttpTransport:
    """``push: http``. ``digests``: the digests the server checks (``GET /weights``' ``digests``); None:
    asked at the first snapshot (see :meth:`server_digests`)."""

    name = "http"
    max_pending = 2

    def __init__(
        self, client: GeneratorClient, threads: int = HASH_THREADS, digests: Sequence[str] | None = None
    ):
        self.client = client
        self._digests = list(digests) if digests is not None else None
        self._sha256_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="push-sha256")
        self._blake3_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-blake3")
        """One thread: BLAKE3 takes the bytes in order (its own threads share out each large buffer)."""

    def server_digests(self) -> list[str]:
        """The digests the server checks, preferred first: asked once (``GET /weights``, not retried).
        When the server cannot be asked, the fallback digest for this time, and it is asked again next time
        (a snapshot must not fail, or wait for retries, for want of it)."""
        if self._digests is None:
            try:
                self._digests = self.client.weights_spec(retries=0).digests
            except GeneratorError as e:
                log.warning("GET /weights failed (%s); hashing with %s meanwhile", e, FALLBACK_DIGEST)
                return [FALLBACK_DIGEST]
        return self._digests

    def _new_digest(self) -> Blake3Digest | ChunkedSha256:
        if pick_digest(self.server_digests()) == "blake3":
            return Blake3Digest(self._blake3_thread)
        return ChunkedSha256(self._sha256_pool)

    def snapshot(
        self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str], adapter: dict | None = None
    ) -> HttpSnapshot:
        digest = self._new_digest()
        metadata = adapter_metadata(adapter)
        if getattr(tensors, "gathers_on_read", False):
            # A sharded learner's tensors (distributed.FullTensors): each read of another bucket gathers it
            # on every rank, so read once, in the buckets' order, and hash once everything is copied.
            names = [n for n in tensors if n in dtypes] + [n for n in dtypes if n not in tensors]
            copies = {name: self._copy(tensors, name, dtypes[name]) for name in names}
            head, order = safetensors_layout(
                {n: (safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in copies.items()}, metadata
            )
            digest.add(head)
            for name in order:
                digest.add(tensor_bytes(copies[name]))
        else:
            specs = {}
            for name, served in dtypes.items():
                t = tensors[name]
                specs[name] = (safetensors_dtype(served_dtype(t, served)), tuple(t.shape))
            # the layout is known before any copy, so each tensor is hashed while the next ones copy
            head, order = safetensors_layout(specs, metadata)
            digest.add(head)
            copies = {}
            for name in order:
                copies[name] = self._copy(tensors, name, dtypes[name])
                digest.add(tensor_bytes(copies[name]))  # hashed in the digest's threads
        digest.close()
        body = SafetensorsBody(copies, metadata)  # views of the same memory the threads hash
        assert body.head == head and body.order == order
        return HttpSnapshot(body, digest, adapter=adapter is not None)

    @staticmethod
    def _copy(tensors: Mapping[str, torch.Tensor], name: str, served: str) -> torch.Tensor:
        return host_snapshot({name: tensors[name]}, {name: served})[name].contiguous()

    def push(self, snapshot: HttpSnapshot | Mapping[str, torch.Tensor], version: int) -> dict:
        try:
            if isinstance(snapshot, HttpSnapshot):
                digest = self._digest_argument(snapshot)
                return self.client.push_body(
                    snapshot.body, version, adapter=snapshot.adapter, **digest
                ).model_dump()
            return self.client.push_weights(snapshot, version).model_dump()
        except StaleVersionError:
            # A retried PUT whose first attempt did land answers 409; that is success.
            if self.client.health().weights_version == version:
                return {"weights_version": version}
            raise

    def _digest_argument(self, snapshot: HttpSnapshot) -> dict[str, str]:
        """``push_body``'s digest argument: the snapshot's digest when this server checks it; none (so
        ``push_body`` computes the chunked SHA-256) for a snapshot hashed for another server (replicas of
        one transport kind share one snapshot) that checks a digest this one does not."""
        kind = snapshot.digest.name
        if kind in self.server_digests():
            return {PUSH_BODY_ARGUMENT[kind]: snapshot.digest.result()}
        return {}

    def close(self) -> None:
        self._sha256_pool.shutdown(wait=False, cancel_futures=True)
        self._blake3_thread.shutdown(wait=False, cancel_futures=True)
