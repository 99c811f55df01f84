"""LoRA adapter pushes (``--enable-lora``): check an adapter before the engine sees it, stage it as the peft
folder vLLM loads.

An adapter push is a safetensors file of peft's adapter tensors (``base_model.model.<module>.lora_A.weight``
of shape (r, in) and ``...lora_B.weight`` of shape (out, r), for linear layers ``<module>`` of the served
model) with its adapter_config.json as JSON under the ``adapter_config`` key of the file's metadata
(``online_dpo_protocol.ADAPTER_METADATA_KEY``). Everything that can be wrong with it (not LoRA, a rank over
``--max-lora-rank``, a module the model lacks, a shape that does not fit, A without B) is a 400 here, before
the engine is touched; the engine then loads it beside the adapter it serves (``GenerationEngine
.update_adapter``), so generation goes on meanwhile and a failed push leaves the previous version serving.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from generator_server.errors import ApiError
from generator_server.weights import FLOAT_DTYPES, MAX_HEADER_BYTES, TensorInfo, read_safetensors_header
from online_dpo_protocol.models import ADAPTER_METADATA_KEY

ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
"""The names vLLM (and peft) read in an adapter folder."""
TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
REFUSED_FEATURES = {
    "use_dora": "DoRA", "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern", "layer_replication": "layer_replication",
}  # fmt: skip
"""adapter_config.json keys whose non-empty values this server refuses (a plain LoRA on linear layers is what
a push carries; vLLM implements some of these differently or not at all)."""

NOT_ENABLED = (
    "this server serves no LoRA adapters: start it with --enable-lora --max-lora-rank N to take adapter "
    "pushes, or push whole weights (the trainer's lora_sync: merged)"
)


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file whose structure ``read_safetensors_header`` checked."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(length, MAX_HEADER_BYTES)))
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def check_adapter(path: Path, expected: dict[str, TensorInfo], max_rank: int) -> dict:
    """The adapter config of the adapter file ``path`` once it is checked against the served model's tensors
    ``expected`` and ``max_rank`` (400 naming the problem otherwise)."""
    tensors = read_safetensors_header(path)
    raw = safetensors_metadata(path).get(ADAPTER_METADATA_KEY)
    if raw is None:
        raise ApiError(
            400, f"an adapter push needs its adapter_config.json as JSON under the '{ADAPTER_METADATA_KEY}' "
            "key of the safetensors metadata; it has none",
        )  # fmt: skip
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the adapter's '{ADAPTER_METADATA_KEY}' metadata is not JSON: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ApiError(400, "the adapter's config is not that of a LoRA adapter (peft_type LORA)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise ApiError(
            400, f"the adapter's rank r={rank!r} is not from 1 to this server's --max-lora-rank {max_rank}"
        )
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise ApiError(400, f"the adapter's lora_alpha {alpha!r} is not a positive number")
    refused = [name for key, name in REFUSED_FEATURES.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias {config['bias']!r}")
    if refused:
        raise ApiError(400, f"the adapter uses {', '.join(refused)}: this server takes plain LoRA adapters")

    modules: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        match = TENSOR_NAME.match(name)
        if match is None:
            raise ApiError(
                400, f"'{name}' is not a LoRA tensor named as peft names them: "
                "'base_model.model.<module>.lora_A.weight' (or lora_B)",
            )  # fmt: skip
        modules.setdefault(match["module"], {})[match["kind"]] = info
    if not modules:
        raise ApiError(400, "the adapter holds no tensors")
    problems = []
    for module, pair in sorted(modules.items()):
        weight = expected.get(f"{module}.weight")
        if weight is None or len(weight.shape) != 2:
            problems.append(f"'{module}' is no linear layer of the served model")
            continue
        if set(pair) != {"A", "B"}:
            has, lacks = ("A", "B") if "A" in pair else ("B", "A")
            problems.append(f"'{module}' has lora_{has} without lora_{lacks}")
            continue
        out_features, in_features = weight.shape
        want = {"A": (rank, in_features), "B": (out_features, rank)}
        for kind, info in pair.items():
            if info.shape != want[kind]:
                shape, wanted = list(info.shape), list(want[kind])
                problems.append(f"'{module}.lora_{kind}' has shape {shape}, expected {wanted}")
            if info.dtype not in FLOAT_DTYPES:
                problems.append(f"'{module}.lora_{kind}' is {info.dtype}, not a floating point dtype")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ApiError(400, f"the adapter does not fit the served model: {shown}")
    return config


def stage_adapter(staged: Path, config: dict) -> Path:
    """Turn a staging folder holding a checked adapter upload (``model.safetensors``) into the peft folder
    vLLM loads (``adapter_model.safetensors``, ``adapter_config.json``); returns it."""
    (staged / "model.safetensors").rename(staged / ADAPTER_FILE)
    (staged / ADAPTER_CONFIG).write_text(json.dumps(config))
    return staged
