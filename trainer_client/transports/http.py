"""``push: http``: the weights as one safetensors body in ``PUT /weights`` (works wherever the URL does)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trainer_client.client import GeneratorClient, StaleVersionError
from trainer_client.transports.base import host_snapshot


class HttpTransport:
    name = "http"
    max_pending = 2

    def __init__(self, client: GeneratorClient):
        self.client = client

    def snapshot(self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str]):
        return host_snapshot(tensors, dtypes)

    def push(self, snapshot, version: int) -> dict:
        try:
            return self.client.push_weights(snapshot, version).model_dump()
        except StaleVersionError:
            # A retried PUT whose first attempt did land answers 409; that is success.
            if self.client.health().weights_version == version:
                return {"weights_version": version}
            raise

    def close(self) -> None:
        pass
