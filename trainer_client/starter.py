"""The demo's starter policy: a tiny Llama taught two-digit addition by supervised warm-up.

Online DPO needs a policy that is sometimes right: with a 0/1 reward, K samples that are all wrong give
no preference pair. So the demo first trains its own small model (character tokenizer, 0.66M parameters)
on the task, and stops when greedy accuracy on a validation slice of the *training* prompts reaches a
target. Stopping on accuracy instead of a step count matters: with a fixed step count the starter's
accuracy lands anywhere from 0.09 to 0.84 depending on the seed, and DPO gains little at either end.

The folder is a plain Hugging Face model folder (safetensors, fast tokenizer) that vLLM and transformers
both load. It is cached under a key of every setting that shapes it, so the second run skips the warm-up.

    python -m trainer_client.starter --seed 0            # prints the folder
    python -m trainer_client.starter --size 300m --device cuda   # a 308M-parameter starter, on a GPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer_client.tasks.arithmetic import ALPHABET, ArithmeticTask

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
STARTER_FORMAT = 1  # bump when the recipe changes so stale caches are not reused


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONLINE_DPO_CACHE", Path.home() / ".cache" / "online-dpo"))


@dataclass(frozen=True)
class StarterConfig:
    """Everything that shapes the starter model; its hash is the cache key."""

    seed: int = 0
    """Seed of the weight initialisation and of the order of the warm-up batches."""
    target_accuracy: float = 0.4
    """Stop the warm-up once greedy accuracy on the validation slice reaches this."""
    eval_every: int = 10
    """Check validation accuracy every this many optimizer steps..."""
    eval_every_near: int = 2
    """...and every this many once it has reached half the target (accuracy jumps fast at lr 1e-3)."""
    max_steps: int = 3000
    """Give up (error) if the target is not reached by then."""
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    """Linear learning-rate warm-up; the wide models of ``STARTER_SIZES`` diverge without it."""
    num_validation: int = 500
    """Validation slice taken from the training prompts (the held-out set stays unseen)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    """head_dim = hidden_size / num_heads = 32, the smallest vLLM's CPU attention accepts."""
    intermediate_size: int = 256
    max_position_embeddings: int = 32
    split_seed: int = 0
    """The task's train / held-out split (see ``ArithmeticTask``)."""

    def key(self) -> str:
        settings = asdict(self)
        if settings["warmup_steps"] == 0:  # keep the cache keys of starters built before it existed
            del settings["warmup_steps"]
        blob = json.dumps({"format": STARTER_FORMAT, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


STARTER_SIZES: dict[str, dict] = {
    "tiny": {},  # 0.66M parameters: the CPU demo
    # 308M parameters (24 layers of width 1024): the GPU run of docs/BENCHMARKS.md. A smaller learning
    # rate with warm-up, as usual for a model this wide.
    "300m": dict(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=2816,
        learning_rate=1e-4,
        warmup_steps=50,
    ),
}


def starter_config(size: str = "tiny", **changes) -> StarterConfig:
    """The ``StarterConfig`` of a named size (``STARTER_SIZES``), with ``changes`` on top."""
    if size not in STARTER_SIZES:
        raise ValueError(f"unknown starter size {size!r}; choose one of {', '.join(STARTER_SIZES)}")
    return StarterConfig(**{**STARTER_SIZES[size], **changes})


# ----------------------------------------------------------------------------------------------------------
# tokenizer: one token per character, BOS prepended, no spaces in the decoded text
# ----------------------------------------------------------------------------------------------------------
def char_tokenizer():
    """A WordLevel tokenizer over single characters, wrapped as a transformers fast tokenizer.

    Encoding ``"37+45="`` gives ``[<s>, 3, 7, +, 4, 5, =]`` in transformers and in vLLM alike (the post
    processor adds BOS whenever special tokens are added, which both do by default for a text prompt).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


# ----------------------------------------------------------------------------------------------------------
# batches and greedy decoding (transformers, no server needed)
# ----------------------------------------------------------------------------------------------------------
def sft_batch(tokenizer, prompts: list[str], answers: list[str], device: str = "cpu"):
    """Right-padded ``<s> prompt answer </s>`` with labels on the answer and EOS only."""
    import torch

    rows, labels = [], []
    for prompt, ans in zip(prompts, answers, strict=True):
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(ans, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    label_ids = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_ids[i, : len(r)] = torch.tensor(lab)
        attention[i, : len(r)] = 1
    return input_ids.to(device), attention.to(device), label_ids.to(device)


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy decoding in transformers; every prompt has the same length, so no padding is needed."""
    import torch

    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts], device=model.device)  # (B, T)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_ids = model(input_ids=ids).logits[:, -1].argmax(-1)  # (B,)
            next_ids = torch.where(done, tokenizer.eos_token_id, next_ids)
            out.append(next_ids)
            done |= next_ids == tokenizer.eos_token_id
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if done.all():
                break
    gen = torch.stack(out, dim=1).tolist()
    texts = []
    for row in gen:
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def teacher_forced_accuracy(model, tokenizer, task: ArithmeticTask, prompts: list[str]) -> float:
    """Greedy exact-match accuracy in one forward pass.

    Greedy decoding yields ``answer </s>`` exactly when, fed the right prefix, the argmax is the right
    next token at every answer position; so one teacher-forced pass (not one pass per generated token)
    gives the same accuracy (up to special tokens that decoding would drop)."""
    import torch

    was_training = model.training
    model.eval()
    answers = [task.target(p) for p in prompts]
    input_ids, attention, labels = sft_batch(tokenizer, prompts, answers, model.device)
    with torch.no_grad():
        predicted = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].argmax(-1)  # (B, T-1)
    model.train(was_training)
    targets = labels[:, 1:]  # (B, T-1): the token each position must predict, -100 where none
    right = (predicted == targets) | (targets == -100)
    return right.all(dim=1).float().mean().item()


def greedy_accuracy(model, tokenizer, task: ArithmeticTask, prompts: list[str]) -> float:
    was_training = model.training
    model.eval()
    completions = greedy_completions(model, tokenizer, prompts)
    model.train(was_training)
    return sum(task.rewards(prompts, completions)) / len(prompts)


# ----------------------------------------------------------------------------------------------------------
# warm-up
# ----------------------------------------------------------------------------------------------------------
def train_starter(cfg: StarterConfig, out: Path, log=print, device: str = "cpu") -> dict:
    """Supervised warm-up until validation accuracy >= ``cfg.target_accuracy``; saves into ``out``.

    The model trains in float32 on ``device``; on a GPU its matmuls may use TF32 (the warm-up only has to
    reach a target accuracy, which it checks itself)."""
    import random

    import torch
    from transformers import LlamaForCausalLM

    from generator_server.tiny_model import TinyModelSpec, save_llama

    task = ArithmeticTask(split_seed=cfg.split_seed)
    tokenizer = char_tokenizer()
    spec = TinyModelSpec(
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        seed=cfg.seed,
    )
    save_llama(out, tokenizer, spec)  # random init, with a config vLLM is known to accept
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    model.train()
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")

    rng = random.Random(cfg.seed)
    train = task.train_split()
    rng.shuffle(train)
    validation, train = train[: cfg.num_validation], train[cfg.num_validation :]
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )

    t0 = time.time()
    accuracy, step = 0.0, 0
    while step < cfg.max_steps:
        prompts = rng.sample(train, cfg.batch_size)
        batch = sft_batch(tokenizer, prompts, [task.target(p) for p in prompts], device)
        loss = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        step += 1
        every = cfg.eval_every_near if accuracy >= cfg.target_accuracy / 2 else cfg.eval_every
        if step % every == 0:
            accuracy = teacher_forced_accuracy(model, tokenizer, task, validation)
            log(f"starter step {step:4d}  loss {loss.item():.3f}  validation accuracy {accuracy:.3f}")
            if accuracy >= cfg.target_accuracy:
                break
    else:
        raise RuntimeError(
            f"starter warm-up did not reach accuracy {cfg.target_accuracy} in {cfg.max_steps} steps "
            f"(last {accuracy:.3f}); raise max_steps or lower target_accuracy"
        )

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stats = {
        "steps": step,
        "validation_accuracy": accuracy,
        "heldout_accuracy": greedy_accuracy(model, tokenizer, task, task.eval_prompts()),
        "seconds": round(time.time() - t0, 2),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "device": device,
        "config": asdict(cfg),
    }
    torch.set_float32_matmul_precision(matmul_precision)
    (out / "starter.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def ensure_starter(
    cfg: StarterConfig | None = None, cache_dir: str | Path | None = None, log=print, device: str = "cpu"
) -> Path:
    """The cached starter folder for ``cfg``, trained first (on ``device``) if it is not in the cache yet."""
    cfg = cfg or StarterConfig()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / "starters" / f"arithmetic-{cfg.key()}"
    if (final / "starter.json").exists():
        log(f"starter model: cached at {final}")
        return final
    log(f"starter model: training (target validation accuracy {cfg.target_accuracy}) -> {final}")
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        stats = train_starter(cfg, partial, log=log, device=device)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():
            partial.rename(final)  # atomic: a crash never leaves a half-written cache entry
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(
        f"starter model: {stats['num_parameters'] / 1e6:.1f}M parameters, {stats['steps']} steps, "
        f"{stats['seconds']:.0f} s on {device}, "
        f"held-out accuracy (transformers greedy) {stats['heldout_accuracy']:.3f}"
    )
    return final


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--seed", type=int, default=StarterConfig.seed)
    parser.add_argument("--size", choices=list(STARTER_SIZES), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--target-accuracy", type=float, default=StarterConfig.target_accuracy)
    parser.add_argument("--cache-dir", default=None, help="default: $ONLINE_DPO_CACHE or ~/.cache/online-dpo")
    parser.add_argument("--torch-threads", type=int, default=1, help="1 is fastest on a small, busy CPU")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.torch_threads)
    cfg = starter_config(args.size, seed=args.seed, target_accuracy=args.target_accuracy)
    print(ensure_starter(cfg, args.cache_dir, device=args.device))


if __name__ == "__main__":
    main()
