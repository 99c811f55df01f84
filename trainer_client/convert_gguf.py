"""``trainer-client convert-gguf``: a GGUF file as a Hugging Face model folder, ahead of time.

    trainer-client convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf                # into the cache
    trainer-client convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smol [--dtype float32]

Training (``model: FILE.gguf``) and serving (``generator-server --model FILE.gguf``) convert a GGUF file by
themselves on first use; this command does it beforehand (so the first start is not the slow one), or into
a folder of your choosing, e.g. to inspect or edit it. Without ``--out`` it fills the same cache entry those
use. The folder's path is the only thing printed on stdout, so scripts can capture it; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from generator_server.gguf_model import DTYPES, GGUFError, convert_gguf, resolve_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the .gguf file to convert")
    parser.add_argument(
        "--out", metavar="DIR",
        help="folder to write (must not exist yet, or be empty); default: the cache folder that training "
        "and serving the file use ($ONLINE_DPO_CACHE, else ~/.cache/online-dpo)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=DTYPES, default="bfloat16",
        help="dtype of the written weights (default bfloat16; the cache always holds bfloat16)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Dequantize a GGUF file into a model folder (safetensors, tokenizer, chat template).

    Prints the folder's path. Exits 2 when the file cannot be converted (missing, an architecture
    transformers cannot read, the gguf extra not installed), with what to do about it."""
    if args.out is None and args.dtype != "bfloat16":
        print(
            "error: the cache holds bfloat16 folders only; give --out DIR for another --dtype",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    started = time.monotonic()
    try:
        if args.out is None:
            folder = resolve_model(args.file)  # (logs whether it converted, and how long it took)
        else:
            folder = str(convert_gguf(args.file, args.out, dtype=args.dtype))
            logging.getLogger("trainer_client").info("converted in %.1f s", time.monotonic() - started)
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer-client convert-gguf", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
