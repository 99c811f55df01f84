"""LoRA for the learner: peft adapters on a frozen base, the names the server knows, and merged weights.

With ``lora_rank > 0`` the learner's policy is a peft ``PeftModel``: the base model's linear projections
(``lora_target_modules``) each get a LoRA adapter, ``W x + (alpha / r) * B (A x)``, with ``A`` (r, in) and
``B`` (out, r) trained and ``W`` frozen. What goes where:

- **the reference** is the same model with the adapters switched off (``PeftModel.disable_adapter``): no
  second copy of the base. The switch is a flag on every LoRA layer, so it must not flip while another
  thread runs the policy: the reference's forward stays inside the training step (``reference_ahead`` is
  off with LoRA, unless ``ref_model`` names a separate reference);
- **a push** sends either the adapters alone (``adapter_tensors``, named as in peft's
  ``adapter_model.safetensors``, with ``wire_config``, their ``adapter_config.json`` as the server's vLLM
  reads it) or the merged weights (``MergedWeights``: ``W + (alpha / r) * B A`` under the base model's own
  tensor names, computed as a push reads them);
- **a checkpoint** is peft's adapter folder (``adapter_model.safetensors``, ``adapter_config.json``),
  which ``PeftModel.from_pretrained`` loads and ``merge_checkpoint`` turns into a plain model folder.

peft is imported here only (the ``lora`` extra), when a run has ``lora_rank > 0``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
"""peft's name for an adapter's config in its folder (a LoRA checkpoint has one; a full one has not)."""
ADAPTER_NAME = "default"
"""peft's name of the one adapter the policy has."""
WIRE_KEYS = (
    "peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora",
    "fan_in_fan_out", "modules_to_save", "task_type", "base_model_name_or_path",
)  # fmt: skip
"""The adapter_config.json keys a push carries (all a LoRA adapter's reader needs)."""


def import_peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "lora_rank > 0 needs peft: pip install 'online-dpo-server[lora]' (or pip install peft)"
        ) from None
    return peft


def is_lora_checkpoint(path: str | Path) -> bool:
    """Whether checkpoint folder ``path`` holds LoRA adapters (peft's folder) rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def add_adapters(model, config, resume: str | None = None):
    """``model`` (a transformers causal LM) frozen, with LoRA adapters as ``config`` (a ``TrainConfig``)
    asks: new ones (A random as peft initialises it, B zero: the policy starts as the base), or those of
    checkpoint ``resume``, exactly as saved (fp32). Returns the ``PeftModel``; the adapters are fp32 (the
    master weights) whatever the base's dtype."""
    peft = import_peft()
    if resume is not None:
        saved = json.loads((Path(resume) / ADAPTER_CONFIG).read_text())
        check_resumable(saved, config, resume)
        return peft.PeftModel.from_pretrained(model, resume, is_trainable=True, autocast_adapter_dtype=True)
    lora = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=_number(config.lora_scale_alpha),
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules) if config.lora_target_modules else "all-linear",
        bias="none",
    )
    policy = peft.get_peft_model(model, lora, autocast_adapter_dtype=True)
    for name, p in policy.named_parameters():  # (peft keeps adapters fp32 on a bf16 base; say so here too)
        if p.requires_grad and p.dtype != torch.float32:
            raise RuntimeError(f"{name}: a LoRA adapter in {p.dtype}, expected float32")
    return policy


def check_resumable(saved: dict[str, Any], config, path: str) -> None:
    """Raise unless the adapters saved in ``path`` (their adapter_config.json: ``saved``) are the ones
    ``config`` describes: rank, alpha and dropout (the targets are the checkpoint's)."""
    want = {"r": config.lora_rank, "lora_alpha": config.lora_scale_alpha, "lora_dropout": config.lora_dropout}
    differ = [f"{k}: checkpoint {saved.get(k)}, config {v}" for k, v in want.items() if saved.get(k) != v]
    if differ:
        raise ValueError(
            f"checkpoint {path} holds other LoRA adapters than the config asks: {'; '.join(differ)}"
        )


class AdaptersOff:
    """The reference's log-probabilities as a callable like ``learner.LogProbs``: ``logps`` (the adapted
    model's) run with the policy's adapters switched off, i.e. the frozen base's."""

    def __init__(self, policy, logps):
        self.policy, self.logps = policy, logps

    def __call__(self, *inputs) -> torch.Tensor:
        with self.policy.disable_adapter():
            return self.logps(*inputs)


def train_dropout(policy) -> None:
    """Put the adapters' dropout modules (peft's ``lora_dropout``) in training mode in a policy otherwise
    in eval mode: ``lora_dropout`` applies in the policy's training forward, nowhere else (the reference
    runs with the adapters off, and the generation engine applies none)."""
    for name, module in policy.named_modules():
        if name.split(".")[-2:-1] == ["lora_dropout"] and isinstance(module, torch.nn.Dropout):
            module.train()


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def lora_layers(policy) -> dict[str, Any]:
    """The base model's modules that carry an adapter, by their name in the base model (``model.layers.0
    .self_attn.q_proj``), as peft's ``LoraLayer``s."""
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def base_name(name: str) -> str:
    """A tensor's name in the plain model from its name in the adapted base (``...q_proj.base_layer.weight``
    -> ``...q_proj.weight``)."""
    return name.replace(".base_layer.", ".")


def base_tensors(policy) -> dict[str, torch.Tensor]:
    """The frozen base's tensors under the plain model's names (no adapter tensors)."""
    state = policy.get_base_model().state_dict()
    return {base_name(n): t for n, t in state.items() if ".lora_" not in n}


class MergedWeights(Mapping):
    """The policy's weights with the adapters merged in, ``W + (alpha / r) * B A`` (fp32), under the plain
    model's tensor names; each merged tensor is computed when it is read (a push reads each name once),
    the others are the base's own tensors."""

    def __init__(self, policy):
        self.base = base_tensors(policy)
        self.layers = {f"{name}.weight": layer for name, layer in lora_layers(policy).items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        layer = self.layers.get(name)
        if layer is None:
            return self.base[name]
        with torch.no_grad():
            return self.base[name].float() + layer.get_delta_weight(ADAPTER_NAME).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def adapter_tensors(policy) -> dict[str, torch.Tensor]:
    """The adapters' tensors (live), named as in peft's ``adapter_model.safetensors``
    (``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``): what an adapter push sends."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(policy, adapter_name=ADAPTER_NAME)


def wire_config(policy) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a push carries it (JSON types only; the target modules as
    the short names vLLM matches, e.g. ``q_proj``)."""
    config = policy.peft_config[ADAPTER_NAME].to_dict()
    out = {key: config.get(key) for key in WIRE_KEYS}
    out["peft_type"] = "LORA"
    out["task_type"] = None
    out["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in lora_layers(policy)})
    out["base_model_name_or_path"] = str(out["base_model_name_or_path"] or "")
    return out


def save_adapters(policy, folder: Path) -> None:
    """peft's adapter folder: ``adapter_model.safetensors`` (fp32) and ``adapter_config.json``."""
    policy.save_pretrained(folder, safe_serialization=True)


def merge_checkpoint(checkpoint: str | Path, out: str | Path, base: str | None = None, dtype: str = "auto"):
    """Write ``out``: a plain model folder (config, safetensors, tokenizer) of LoRA checkpoint ``checkpoint``
    merged into its base (``base``, default the base model its adapter_config.json names), in ``dtype``
    (``auto``: the base folder's). Returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generator_server.gguf_model import resolve_model

    peft = import_peft()
    checkpoint, out = Path(checkpoint), Path(out)
    if not is_lora_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} holds no LoRA adapters (no {ADAPTER_CONFIG})")
    saved = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    base = base or saved.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{checkpoint}/{ADAPTER_CONFIG} names no base model: give it (--base)")
    base_dir = resolve_model(base)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    merged = peft.PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer_dir = checkpoint if (checkpoint / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
