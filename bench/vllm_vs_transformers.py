"""Benchmark 2: vLLM through our server against transformers ``generate``, same model and batch.

The server (``python -m generator_server``, a child process) and a transformers model loaded in this
process on the same device stay up for the whole run; rounds alternate between them (and swap order every
round). Both sample at temperature 1 with no top-k/top-p and a fixed length (``ignore_eos`` on the server,
``min_new_tokens = max_new_tokens`` in transformers), so both generate exactly ``batch * n * max_tokens``
tokens per round. transformers runs its default ``generate`` (dynamic KV cache, no compilation), the whole
batch at once unless ``--hf-batch`` splits it. The ratio is vLLM tokens/s over transformers tokens/s.

    PYTHONPATH=$PWD python bench/vllm_vs_transformers.py              # GPU defaults (0.5B, 256 x 128)
    PYTHONPATH=$PWD python bench/vllm_vs_transformers.py --quick      # CPU: tiny model, 8 x 16 tokens
"""

from __future__ import annotations

import argparse
import time

import httpx

from bench.common import (
    SIZES,
    ServerOptions,
    add_common_args,
    bench_device,
    build_model,
    count_params,
    describe_machine,
    human_params,
    machine_line,
    markdown_table,
    median,
    parse_args,
    random_prompts,
    resolve_dtype,
    running_server,
    sync_device,
    write_results,
)

QUICK = {"size": "tiny", "batch": 8, "prompt_len": 16, "max_tokens": 16, "rounds": 2, "enforce_eager": True}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--size", choices=list(SIZES), default="0.5b", help="model size from the ladder")
    parser.add_argument("--batch", type=int, default=256, help="prompts per round")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="generated tokens per completion (fixed)")
    parser.add_argument("--n", type=int, default=1, help="completions per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per side first")
    parser.add_argument(
        "--hf-batch", type=int, default=None, help="prompts per transformers generate call (default: all)"
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="server's share of the GPU; transformers uses what is left",
    )
    add_common_args(parser)
    return parser


# ---------------------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------------------


def vllm_round(client: httpx.Client, prompts: list[list[int]], args) -> tuple[float, int]:
    body = {
        "prompt_token_ids": prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "seed": args.seed,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    response = client.post("/generate", json=body)
    response.raise_for_status()
    results = response.json()["results"]
    seconds = time.perf_counter() - started
    return seconds, sum(len(c["token_ids"]) for r in results for c in r["completions"])


def load_hf_model(model_dir, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(bench_device()).eval()


def hf_round(model, prompts: list[list[int]], args) -> tuple[float, int]:
    import torch

    chunk = args.hf_batch or len(prompts)
    pad_id = model.config.pad_token_id
    torch.manual_seed(args.seed)
    sync_device()
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), chunk):
        # All prompts have the same length: no padding, the attention mask is all ones.
        input_ids = torch.tensor(prompts[i : i + chunk], device=model.device)  # (B, P)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                num_return_sequences=args.n,
                pad_token_id=pad_id,
            )  # (B * n, P + max_tokens)
        tokens += out.shape[0] * (out.shape[1] - input_ids.shape[1])
    sync_device()
    return time.perf_counter() - started, tokens


# ---------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), QUICK, argv)
    dtype = resolve_dtype(args.dtype)
    out = args.out or args.work_dir / "vllm_vs_transformers.json"
    machine = describe_machine()
    print(f"machine: {machine_line(machine)}", flush=True)

    model_dir = build_model(args.size, dtype, args.work_dir / "models")
    spec = SIZES[args.size]
    prompts = random_prompts(args.batch, args.prompt_len, spec.vocab_size, args.seed)
    expected = args.batch * args.n * args.max_tokens
    options = ServerOptions.from_args(args, dtype)
    rounds: dict[str, list[dict]] = {"vllm_server": [], "transformers": []}
    log_path = args.work_dir / "logs" / "vllm_vs_transformers-server.log"
    with (
        running_server(model_dir, options, log_path) as server,
        httpx.Client(base_url=server.url, timeout=httpx.Timeout(1800.0)) as client,
    ):
        # Loaded after the server is ready so that vLLM's memory profiling sees a quiet GPU.
        model = load_hf_model(model_dir, dtype)
        for r in range(args.warmup + args.rounds):
            sides = ["vllm_server", "transformers"] if r % 2 == 0 else ["transformers", "vllm_server"]
            for side in sides:
                if side == "vllm_server":
                    seconds, tokens = vllm_round(client, prompts, args)
                else:
                    seconds, tokens = hf_round(model, prompts, args)
                if tokens != expected:
                    raise RuntimeError(f"{side} generated {tokens} tokens, expected {expected}")
                timed = r >= args.warmup
                note = "" if timed else " (warm-up)"
                print(
                    f"  round {r} {side:12s} {seconds:7.3f} s {tokens / seconds:10,.0f} tok/s{note}",
                    flush=True,
                )
                if timed:
                    rounds[side].append(
                        {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
                    )
        del model

    vllm_tps = median([r["tokens_per_s"] for r in rounds["vllm_server"]])
    hf_tps = median([r["tokens_per_s"] for r in rounds["transformers"]])
    results = {
        "model": {"size": args.size, "params": count_params(spec), "dtype": dtype},
        "vllm_server_tokens_per_s": vllm_tps,
        "transformers_tokens_per_s": hf_tps,
        "ratio": vllm_tps / hf_tps,
        "ratio_best_rounds": max(r["tokens_per_s"] for r in rounds["vllm_server"])
        / max(r["tokens_per_s"] for r in rounds["transformers"]),
        "server_start_seconds": server.start_seconds,
        "rounds": rounds,
    }
    write_results(out, "vllm_vs_transformers", machine, vars(args) | {"dtype": dtype}, results)

    labels = {"vllm_server": "vLLM via POST /generate", "transformers": "transformers generate"}
    rows = [
        [labels[k], median([r["seconds"] for r in v]), median([r["tokens_per_s"] for r in v]),
         min(r["tokens_per_s"] for r in v), max(r["tokens_per_s"] for r in v)]
        for k, v in rounds.items()
    ]  # fmt: skip
    print(f"\n## Benchmark 2: vLLM (our server) vs transformers generate\n\nMachine: {machine_line(machine)}")
    print(
        f"Model: {args.size} Llama ({human_params(count_params(spec))} params, {dtype}); batch {args.batch} "
        f"x n {args.n}, prompt {args.prompt_len} tokens, {args.max_tokens} new tokens (fixed), "
        f"{args.rounds} rounds (median), vLLM enforce_eager={args.enforce_eager}\n"
    )
    print(markdown_table(["path", "seconds", "tokens/s (median)", "min", "max"], rows))
    print(
        f"\nratio vLLM server / transformers: **{vllm_tps / hf_tps:.2f}x** "
        f"(best round vs best round: {results['ratio_best_rounds']:.2f}x)"
    )
    return results


if __name__ == "__main__":
    main()
