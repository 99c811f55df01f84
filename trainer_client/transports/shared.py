"""``push: shared``: the weights as a file in a folder the server can read, loaded by
``POST /weights/load``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from trainer_client.client import GeneratorClient, StaleVersionError
from trainer_client.transports.base import host_snapshot, refuse_adapter


class SharedFolderTransport:
    """Writes ``weights-vNNNNNNNN.safetensors`` under ``shared_dir`` (as ``.NAME.tmp``, renamed when whole,
    so the server never sees a half-written file), has the server load it, and removes older files.
    ``shared_dir_on_server`` is the same folder as the server sees it (default: the same path)."""

    name = "shared"
    max_pending = 2

    def __init__(self, client: GeneratorClient, shared_dir: str, shared_dir_on_server: str | None = None):
        self.client = client
        self.shared_dir = Path(shared_dir)
        self.shared_dir_on_server = shared_dir_on_server or str(self.shared_dir.resolve())

    def snapshot(self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str], adapter=None):
        refuse_adapter(self.name, adapter)
        return host_snapshot(tensors, dtypes)

    def push(self, snapshot, version: int) -> dict:
        from safetensors.torch import save_file

        self.shared_dir.mkdir(parents=True, exist_ok=True)
        name = f"weights-v{version:08d}.safetensors"
        tmp = self.shared_dir / f".{name}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in snapshot.items()}, tmp)
        tmp.rename(self.shared_dir / name)
        try:
            out = self.client.load_weights(f"{self.shared_dir_on_server}/{name}", version).model_dump()
        except StaleVersionError:
            if self.client.health().weights_version != version:  # a retried load that had landed is fine
                raise
            out = {"weights_version": version}
        for old in self.shared_dir.glob("weights-v*.safetensors"):
            if old.name < name:
                old.unlink(missing_ok=True)
        return out

    def close(self) -> None:
        pass
