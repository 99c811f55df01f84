"""``trainer-client merge-lora``: a LoRA checkpoint merged into its base, as a plain model folder.

    trainer-client merge-lora runs/lora/checkpoint-000100 --out models/merged [--base MODEL] [--dtype D]

A run with ``lora_rank > 0`` checkpoints its adapters only (peft's folder: ``adapter_model.safetensors``,
``adapter_config.json``). This writes ``W + (alpha / r) * B A`` for every adapted layer, and the base's other
tensors, as a model folder (config, safetensors, tokenizer) that transformers and vLLM load as any other:
``generator-server --model models/merged`` serves the trained policy without LoRA. The base is the model the
adapter_config.json names (the run's ``model``) unless ``--base`` says otherwise. (``save_merged: true`` in
the run's config writes ``output_dir/merged`` the same way at its end.) The folder's path is the only thing
printed on stdout.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder of a LoRA run (holds adapter_config.json)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write (replaced)")
    parser.add_argument(
        "--base", metavar="MODEL",
        help="the base model folder or GGUF file (default: the one its adapter_config.json names)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="dtype of the written weights (default: the base's)"
    )


def run(args: argparse.Namespace) -> int:
    """Merge a LoRA checkpoint's adapters into its base model: a plain model folder.

    Prints the folder's path. Exits 2 when the checkpoint holds no adapters or its base cannot be found."""
    from trainer_client.lora import merge_checkpoint

    try:
        out = merge_checkpoint(args.checkpoint, args.out, base=args.base, dtype=args.dtype)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer-client merge-lora", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
