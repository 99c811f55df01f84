"""``push: stream``: the safetensors body of ``push: http`` on the server's raw TCP stream port.

The snapshot is ``push: http``'s (a host copy in the served dtypes, hashed with BLAKE3 while it is copied).
The push opens an upload session over HTTP (``POST /weights/stream/begin``: version, size), connects to the
port the server names on the host of its URL, writes the session's 32-byte ticket and then the body straight
from the snapshot's memory, and commits with the digest (``POST /weights/stream/{session}/commit``), which
need not be ready before the first byte goes: the server checks the digest, the names and the shapes and swaps
the weights in, exactly as for ``PUT /weights``. The server receives into the staged file with ``recv_into``
instead of through its HTTP stack (``generator_server/stream.py``), which is what makes this faster than
``http``. A push that fails leaves the previous version serving; the bytes travel unencrypted.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from trainer_client.client import GeneratorClient, GeneratorError, GeneratorUnavailable, StaleVersionError
from trainer_client.transports.base import TransportError
from trainer_client.transports.http import HttpSnapshot, HttpTransport


class StreamUnreachable(TransportError):
    """The stream port could not be reached (a firewall, a port not published): ``push: auto`` then uses
    ``http``."""


class StreamTransport(HttpTransport):
    """``push: stream``: snapshots as ``HttpTransport``'s, hashed with BLAKE3 (the digest the stream port
    checks)."""

    name = "stream"

    def __init__(self, client: GeneratorClient, timeout: float = 600.0):
        super().__init__(client, digests=["blake3"])
        self.timeout = timeout
        self.host = urlsplit(client.base_url).hostname

    def push(self, snapshot: HttpSnapshot, version: int) -> dict:
        body = snapshot.body
        try:
            # (the digest may still be hashing)
            begun = self.client.stream_begin(version, body.nbytes, adapter=snapshot.adapter)
        except StaleVersionError:  # a retried begin whose first attempt's upload had landed
            if self.client.health().weights_version == version:
                return {"weights_version": version}
            raise
        try:
            self._send(begun, body)
            try:
                return self.client.stream_commit(begun["session"], snapshot.digest.result()).model_dump()
            except GeneratorUnavailable:  # the answer was lost: did the version land?
                if self.client.health(retries=2).weights_version == version:
                    return {"weights_version": version}
                raise
        except BaseException:
            try:
                self.client.stream_abort(begun["session"])
            except GeneratorError:
                pass  # the session ended already, or the server drops it after its timeout
            raise

    def _send(self, begun: dict, body) -> None:
        try:
            conn = socket.create_connection((self.host, begun["port"]), timeout=min(self.timeout, 10.0))
        except OSError as e:
            raise StreamUnreachable(
                f"cannot reach the server's stream port {self.host}:{begun['port']} ({e}); publish the port "
                "or use push: http"
            ) from e
        with conn:
            conn.settimeout(self.timeout)
            conn.sendall(bytes.fromhex(begun["ticket"]))
            for chunk in body.chunks():
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)  # the server sees the end; the commit says how it went
