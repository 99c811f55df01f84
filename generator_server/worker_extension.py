"""Methods added to vLLM's GPU/CPU worker (``worker_extension_cls``), called by ``collective_rpc(name)``.

They run inside the worker process that holds the model, which is where CUDA IPC handles must be opened.
Everything they receive is plain data (strings, numbers, bytes): a handle is rebuilt here from its parts,
never unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import torch

from generator_server.engine_plugin import setup
from generator_server.mapped_weights import MappedWeights

setup()  # (this module is imported in the engine's worker process: as the vLLM plugin does there)


def _bytes(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


class WeightReceiver:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.device``, ``self.model_runner``)."""

    def receiver_device_uuid(self) -> str | None:
        """UUID of this worker's GPU as torch reports it (compared with the trainer's); None on CPU."""
        device = getattr(self, "device", None)
        if device is None or getattr(device, "type", None) != "cuda":
            return None
        return str(torch.cuda.get_device_properties(device).uuid)

    def digest_weights(self) -> dict[str, str]:
        """SHA-256 of the raw bytes (row-major, the served dtype) of every weight this worker's model holds:
        parameter name -> hex digest. Parameters are named as vLLM names them (q, k and v stacked into
        ``qkv_proj``, gate and up into ``gate_up_proj``). On the CPU, vLLM packs a linear layer's weight
        for oneDNN and empties the parameter; that weight is read back exactly through the layer's own
        GEMM, from the identity matrix (``I @ W.T = W.T``, no rounding: every sum has one nonzero term)."""
        digests = {}
        for module_name, module in self.model_runner.get_model().named_modules():
            for name, param in module.named_parameters(recurse=False):
                tensor = param.detach()
                if tensor.numel() == 0 and name == "weight" and hasattr(module, "cpu_linear"):
                    tensor = _unpacked_linear_weight(module, tensor.dtype)
                if tensor.numel() == 0 or tensor.is_meta:
                    continue
                raw = tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                digests[f"{module_name}.{name}" if module_name else name] = hashlib.sha256(raw).hexdigest()
        return digests

    def receiver_load_files(self, paths: list[str]) -> dict:
        """Reload the model in place from these safetensors files: vLLM's own ``reload_weights`` (layerwise
        where the model needs it), fed views of the files mapped in memory (``mapped_weights.py``),
        page-locked on a GPU once a file is loaded a second time. Returns seconds, bytes, bytes locked."""
        mapped = getattr(self, "_mapped_weights", None)
        if mapped is None:
            mapped = self._mapped_weights = MappedWeights(lock=self.receiver_device_uuid() is not None)
        started = time.perf_counter()
        files = []
        try:
            for path in paths:
                files.append(mapped.open(Path(path)))
            self.reload_weights(weights_iterator=(t for f in files for t in f.tensors()))
            if mapped.lock:  # every copy out of the files is done before the server may write them again
                torch.cuda.synchronize()
        finally:
            mapped.done(files)
        return {
            "seconds": time.perf_counter() - started,
            "bytes": sum(f.size for f in files),
            "locked_bytes": sum(f.size for f in files if f.locked),
        }

    def receiver_begin(self, layerwise: bool = True) -> None:
        """Start an in-place reload: vLLM's layerwise reload where it exists (it redoes any kernel-specific
        processing of the weights once a layer is complete), else plain loads into the parameters.
        ``layerwise=False`` (``--ipc-load direct``) always loads straight into the parameters: right only
        for a model whose loaded weights need no processing (unquantized, on CUDA), and faster: layerwise
        reload rebuilds every layer on the side and copies it back."""
        model = self.model_runner.get_model()
        if not layerwise:
            self._receiver_layerwise = False
            return
        try:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        except ImportError:
            self._receiver_layerwise = False
        else:
            initialize_layerwise_reload(model)
            self._receiver_layerwise = True

    def receiver_load_ipc(self, handle: dict, tensors: list[dict]) -> int:
        """Map the trainer's GPU buffer described by ``handle``, load ``tensors`` (name, shape, dtype, offset)
        from it into the model, and let go of the buffer before returning. Returns the tensors loaded."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        device = self.device.index if self.device.index is not None else torch.cuda.current_device()
        nbytes = int(handle["nbytes"])
        buffer = rebuild_cuda_tensor(
            torch.Tensor, (nbytes,), (1,), int(handle["tensor_offset"]), torch.UntypedStorage, torch.uint8,
            device, _bytes(handle["storage_handle"]), int(handle["storage_size_bytes"]),
            int(handle["storage_offset_bytes"]), False, _bytes(handle["ref_counter_handle"]),
            int(handle["ref_counter_offset"]), _bytes(handle.get("event_handle")),
            bool(handle["event_sync_required"]),
        )  # fmt: skip
        weights = []
        for t in tensors:
            dtype = getattr(torch, t["dtype"])
            size = dtype.itemsize
            for d in t["shape"]:
                size *= d
            begin = int(t["offset"])
            weights.append((t["name"], buffer[begin : begin + size].view(dtype).view(t["shape"])))
        self.model_runner.get_model().load_weights(weights)
        torch.cuda.synchronize(device)  # every copy out of the buffer is done: the trainer may reuse it
        del weights, buffer
        return len(tensors)

    def receiver_finish(self) -> None:
        """End the reload begun by :meth:`receiver_begin` (process completed layers)."""
        if getattr(self, "_receiver_layerwise", False):
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)
        self._receiver_layerwise = False


@torch.no_grad()
def _unpacked_linear_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a CPU linear layer whose parameter vLLM emptied after packing it."""
    size_in = getattr(module, "input_size_per_partition", None) or module.input_size
    identity = torch.eye(size_in, dtype=dtype)
    return module.cpu_linear(identity, module.weight, None).t().to(dtype)  # (in, out) -> (out, in)
