"""Weight transports: how a new policy version reaches a generation server.

Every transport has the same two calls (see :class:`~trainer_client.transports.base.WeightTransport`):

* ``snapshot(tensors, dtypes)`` runs in the training thread right after the optimizer step and copies what
  the push needs (the optimizer will change the live tensors while the push runs);
* ``push(snapshot, version)`` runs in the pusher thread and makes the server serve it as ``version``.

``push`` in the trainer config picks one by name; ``auto`` asks the server what it accepts and where it runs
(``GET /weights``): CUDA IPC when the server's engine is on this very GPU of this host, else its stream port
when it has one, else HTTP.

=========  ===========================================  =======================================
name       how                                          when
=========  ===========================================  =======================================
``http``   ``PUT /weights``, safetensors streamed       anywhere the server's URL reaches
``shared`` a file in a shared folder + ``/weights/load``  same host or a shared volume
``stream`` the same body on the server's raw TCP port    the server has ``--stream-port``, reachable
``ipc``    CUDA IPC handles of GPU buckets, as JSON      trainer and server on one GPU
``nccl``   (reserved: a broadcast to the server's GPUs)  trainer and server on different GPUs
=========  ===========================================  =======================================
"""

from __future__ import annotations

from online_dpo_protocol import TRANSPORTS, PushTarget
from trainer_client.client import GeneratorClient
from trainer_client.transports.base import TransportError, WeightTransport


def choose_transport(requested: str, target: PushTarget, device: str, adapter: bool = False) -> str:
    """The transport ``requested`` (``auto`` resolved) for a server described by ``target``; raise
    :class:`TransportError` saying why when the server cannot take it. ``adapter``: the pushes are LoRA
    adapters, which only ``http`` and ``stream`` carry (``auto`` never picks ``ipc`` for them)."""
    from trainer_client.transports.ipc import local_gpu

    offered = target.transports
    if requested == "auto":
        here = local_gpu(device)
        on_its_gpu = here is not None and here == (target.host_id, target.gpu_uuid)
        if not adapter and "ipc" in offered and on_its_gpu:
            return "ipc"
        return "stream" if "stream" in offered and target.stream_port is not None else "http"
    if requested not in offered:
        hint = {
            "ipc": " (CUDA IPC needs the server's engine on a GPU of this host)",
            "shared": " (start the server with --checkpoint-root)",
            "stream": " (its stream port is off: it is on unless started with --stream-port off or TLS)",
        }.get(requested, "")
        raise TransportError(
            f"push: {requested} is not offered by the server, which accepts {offered}{hint}; "
            "use push: auto or http"
        )
    if requested == "ipc":
        here = local_gpu(device)
        if here is None:
            raise TransportError(f"push: ipc needs the trainer on a CUDA device, not {device}")
        if here[0] != target.host_id:
            raise TransportError("push: ipc needs the server on this host; it runs on another one")
        if here[1] != target.gpu_uuid:
            raise TransportError(
                f"push: ipc needs the server on the trainer's GPU ({here[1]}); it runs on {target.gpu_uuid}"
            )
    return requested


def make_transport(
    name: str, client: GeneratorClient, config=None, target: PushTarget | None = None
) -> WeightTransport:
    """The transport called ``name`` (already resolved by :func:`choose_transport`); ``config`` (a
    ``TrainConfig``) supplies ``shared_dir`` and ``ipc_bucket_mib``; ``target`` (the server's ``GET
    /weights``, if at hand) the digests ``http`` hashes with, which it asks for itself otherwise."""
    if name == "http":
        from trainer_client.transports.http import HttpTransport

        return HttpTransport(client, digests=target.digests if target is not None else None)
    if name == "shared":
        from trainer_client.transports.shared import SharedFolderTransport

        if not getattr(config, "shared_dir", None):
            raise TransportError("push: shared needs shared_dir (a folder the server can read)")
        return SharedFolderTransport(client, config.shared_dir, config.shared_dir_on_server)
    if name == "stream":
        from trainer_client.transports.stream import StreamTransport

        return StreamTransport(client, timeout=getattr(config, "request_timeout", 600.0))
    if name == "ipc":
        from trainer_client.transports.ipc import IpcTransport

        return IpcTransport(client, bucket_bytes=getattr(config, "ipc_bucket_mib", 1024) * 2**20)
    raise TransportError(f"unknown transport {name!r}; choose one of {TRANSPORTS}")


__all__ = ["TRANSPORTS", "TransportError", "WeightTransport", "choose_transport", "make_transport"]
