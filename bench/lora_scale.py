"""Benchmark: LoRA at scale (issue 28). An 8B Llama-3.1-shaped model with LoRA rank 16 on every linear layer,
trained against a generation server on the same GPU with adapter-only pushes; and the 1.13B model with LoRA
against full fine-tuning of the same model, pushed by the same transport.

The models are random weights of the real shapes, built on the device (no download) by this script in a
child process (this process must leave the GPU to the server it then starts): ``8b`` is Llama-3.1-8B's
(hidden 4096, 32 layers, 32 heads with 8 KV heads, MLP 14336, vocabulary 128256: the bundled 512-token BPE
tokenizer padded with tokens it never produces), ``1.13b`` the ``1b`` of bench/common.py, ``tiny`` a CPU
check of the same path (GQA and a padded vocabulary too). For each run (``--runs``: ``lora``, ``full``) and
each ``--staleness`` (0: synchronous, 1: asynchronous) it starts a server (``--enable-lora --max-lora-rank
16`` for LoRA), trains ``--steps`` steps in this process (`push: auto`: the stream port) and reports, after
``--skip`` warm-up steps:

- wall s/step, g (the producer's seconds per step: generation, scoring, the reference where ahead), t (the
  trainer's seconds per step), and wall / max(g, t) of the asynchronous run (the issue's target: <= 1.2);
- push: seconds per push as the pusher saw it (receiving, checking and swapping in; in the asynchronous
  run it includes waiting for the generation in flight), the server's pause (``push_pause_seconds``: the
  write lock held, generation stopped) and bytes per push (``push_bytes``);
- peak GPU memory: the trainer's (``torch.cuda.max_memory_reserved``) and the server's (nvidia-smi, its
  processes), in GiB.

Prints a markdown table and writes JSON (``--out``, default ``runs/bench/lora_scale-SHAPE.json``).

    python bench/lora_scale.py --shape 8b                       # GPU: LoRA at 8B
    python bench/lora_scale.py --shape 1.13b --runs lora,full   # GPU: LoRA against full fine-tuning
    PYTHONPATH=$PWD python bench/lora_scale.py --device cpu --shape tiny   # the CPU check (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.async_vs_sync import write_prompts  # noqa: E402
from bench.common import (  # noqa: E402
    DEFAULT_WORK_DIR,
    ServerOptions,
    child_env,
    describe_machine,
    human_params,
    machine_line,
    markdown_table,
    running_server,
    write_results,
)

SHAPES = {
    # Llama-3.1-8B (8.03B parameters)
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    # bench/common.py's "1b": the 1.13B model of the other GPU benchmarks
    "1.13b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=5632, vocab_size=512),
    # the CPU check: GQA and a vocabulary larger than the tokenizer's, as at 8B
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024),
}  # fmt: skip
GPU = dict(steps=12, skip=2, batch_size=16, max_new_tokens=128, micro_batch_size=4, max_model_len=1024)
CPU = dict(steps=4, skip=1, batch_size=4, max_new_tokens=16, micro_batch_size=None, max_model_len=256)


# ---------------------------------------------------------------------------------------------------------
# The model, built on the device in a child process
# ---------------------------------------------------------------------------------------------------------
def build(shape: str, device: str, out: Path) -> Path:
    """The model folder of ``shape`` (random weights, bf16 on a GPU, fp32 on the CPU), built once."""
    if (out / ".complete").exists():
        return out
    code = f"from bench.lora_scale import _build; _build({shape!r}, {device!r}, {str(out)!r})"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())
    print(f"built {shape} in {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def _build(shape: str, device: str, out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out)
    shutil.rmtree(out_dir, ignore_errors=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = padded_tokenizer(SHAPES[shape]["vocab_size"])
    config = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: minutes faster than on the CPU at 8B
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    (out_dir / ".complete").write_text(json.dumps({"shape": shape, "params": params, "dtype": str(dtype)}))


def padded_tokenizer(vocab_size: int):
    """The bundled BPE tokenizer (generator_server/tiny_model.py) with filler tokens up to ``vocab_size``:
    entries of its vocabulary that no merge produces, so tokenizing is unchanged and every id the model may
    sample decodes (to ``<xN>``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from generator_server.tiny_model import BOS, CHAT_TEMPLATE, EOS, PAD, UNK, bundled_corpus
    from generator_server.tiny_model import train_bpe_tokenizer as bpe

    base = bpe(bundled_corpus(), 512)
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    while len(vocab) < vocab_size:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=UNK,
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------
def server_gpu_gib() -> float | None:
    """GPU memory of every process on the GPU but this one (the server and its engine), in GiB."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
    used = [int(m) for pid, m in (line.split(",") for line in out.splitlines() if "," in line)
            if int(pid) != os.getpid()]  # fmt: skip
    return round(sum(used) / 1024, 2)


def summarise(records: list[dict], skip: int) -> dict:
    rs = records[skip:]
    g = mean(r["gen_seconds"] + r["score_seconds"] + r["reference_seconds"] for r in rs)
    t = mean(r["train_seconds"] for r in rs)
    wall = mean(r["wall_seconds"] for r in rs)
    return {
        "steps_measured": len(rs),
        "wall_per_step": wall,
        "producer_per_step": g,
        "train_per_step": t,
        "wall_over_max_g_t": wall / max(g, t),
        "push_seconds": median(r["push_seconds"] for r in rs),
        "push_pause_seconds": median(r.get("push_pause_seconds") or 0.0 for r in rs),
        "push_bytes": median(r["push_bytes"] for r in rs),
        "trainer_peak_gib": max((r.get("gpu_peak_gib") or 0.0) for r in rs),
        "reward_mean": mean(r["reward_mean"] for r in rs),
    }


def measure(config, skip: int, device: str) -> dict:
    """Train ``config`` (its server running) and summarise its metrics after ``skip`` steps, with both sides'
    GPU memory; its checkpoints are deleted (16 GB of base at 8B, for nothing: only the metrics count)."""
    import torch

    from trainer_client.train import run_training

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_training(config)
    out_dir = Path(config.output_dir)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = summarise(records, skip) | {"server_peak_gib": server_gpu_gib()}
    if device == "cuda":
        summary["trainer_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    for folder in out_dir.glob("checkpoint-*"):
        shutil.rmtree(folder)
    return summary


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--shape", default="8b", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--runs", default=None, help="lora and/or full (default: lora at 8b, both elsewhere)")
    parser.add_argument("--staleness", default="0,1", help="max_staleness values, run in this order")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip", type=int, default=None, help="first steps left out of the averages")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (K = 4 each)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="the server's share")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="any other trainer config key, for every run (repeatable)",
    )  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    defaults = GPU if args.device == "cuda" else CPU
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    runs = (args.runs or ("lora" if args.shape == "8b" else "lora,full")).split(",")

    from trainer_client.config import TrainConfig, parse_override  # (after the arguments: --help is instant)

    work = args.work_dir / "lora_scale"
    model_dir = build(args.shape, args.device, args.work_dir / "models" / f"llama-{args.shape}-{args.device}")
    info = json.loads((model_dir / ".complete").read_text())
    task = write_prompts(work / "prompts.jsonl")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    results, rows = {}, []
    machine = describe_machine()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(params=info["params"], runs=runs)
    out = args.out or args.work_dir / f"lora_scale-{args.shape}.json"
    for run in runs:  # one server per kind of run (with --enable-lora for LoRA), for every staleness
        lora = run == "lora"
        server_flags = ["--stream-port", "0"] + (["--enable-lora", "--max-lora-rank", "16"] if lora else [])
        options = ServerOptions(
            dtype=dtype, gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
            enforce_eager=args.device == "cpu", extra=tuple(server_flags),
        )  # fmt: skip
        with running_server(model_dir, options, work / f"server-{args.shape}-{run}.log") as server:
            for staleness in [int(s) for s in args.staleness.split(",")]:
                label = f"{run}-staleness-{staleness}"
                out_dir = work / f"{args.shape}-{label}"
                shutil.rmtree(out_dir, ignore_errors=True)
                config = TrainConfig(
                    model=str(model_dir), server_url=server.url, task=str(task), reward="length",
                    steps=args.steps, batch_size=args.batch_size, samples_per_prompt=4,
                    max_new_tokens=args.max_new_tokens, max_staleness=staleness, device=args.device,
                    learning_rate=1e-4 if lora else 1e-5, micro_batch_size=args.micro_batch_size,
                    gradient_checkpointing=args.device == "cuda", lora_rank=args.lora_rank if lora else 0,
                    output_dir=str(out_dir), progress_bar=False, checkpoint_every=0,
                    **dict(parse_override(item) for item in args.overrides),
                )  # fmt: skip
                print(f"{args.shape} {label}: {args.steps} steps ...", flush=True)
                results[label] = s = measure(config, args.skip, args.device)
                write_results(out, "lora_scale", machine, settings, results)  # (each run's, as it ends)
                server_gib = s["server_peak_gib"] if s["server_peak_gib"] is not None else "n/a"
                rows.append(
                    [run, staleness, s["wall_per_step"], s["producer_per_step"], s["train_per_step"]]
                    + [s["wall_over_max_g_t"], s["push_seconds"], s["push_pause_seconds"]]
                    + [s["push_bytes"] / 2**20, s["trainer_peak_gib"], server_gib]
                )
    headers = ["run", "max_staleness", "wall s/step", "g s/step", "t s/step", "wall / max(g, t)"]
    headers += ["push s", "push pause s", "push MiB", "trainer peak GiB", "server GiB"]
    if "lora-staleness-0" in results and "full-staleness-0" in results:
        ratio = results["full-staleness-0"]["push_seconds"] / results["lora-staleness-0"]["push_seconds"]
        results["full_over_lora_push"] = ratio
    print()
    print(
        f"## LoRA at scale: {args.shape} ({human_params(info['params'])} params, {dtype}), LoRA rank "
        f"{args.lora_rank} on every linear layer, {args.steps} steps (first {args.skip} not averaged), batch "
        f"{args.batch_size} x K=4, {args.max_new_tokens} new tokens; {machine_line(machine)}"
    )
    print()
    print(markdown_table(headers, rows))
    if "full_over_lora_push" in results:
        ratio = results["full_over_lora_push"]
        print(f"\nfull push / LoRA push (synchronous runs, same transport): {ratio:.1f}x")
    write_results(out, "lora_scale", machine, settings, results)


if __name__ == "__main__":
    main()
