"""Build a tiny Llama model folder from nothing: no downloads, a few seconds on a CPU.

The folder (config, tokenizer, ``model.safetensors``) loads in both vLLM and transformers, so tests,
the README and benchmarks can serve and train a real model anywhere.

    build-tiny-model --out models/tiny
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A plain "role: content" chat template, so the OpenAI chat endpoint works on the tiny model."""


@dataclass
class TinyModelSpec:
    vocab_size: int = 512
    """BPE vocabulary size of the tokenizer trained on the bundled corpus."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    """head_dim = hidden_size / num_heads; vLLM's CPU attention needs head_dim >= 32."""
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    seed: int = 0
    tie_word_embeddings: bool = False


def bundled_corpus() -> str:
    return resources.files("generator_server").joinpath("data/corpus.txt").read_text()


def train_bpe_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_llama(out: Path, tokenizer, spec: TinyModelSpec, dtype: str = "float32") -> Path:
    """Initialise a Llama for ``tokenizer`` and save it (safetensors) with the tokenizer into ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.hidden_size // spec.num_heads < 32:
        raise ValueError("head_dim (hidden_size / num_heads) must be >= 32 for vLLM's CPU attention")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
        torch_dtype=dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_model(out: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Train a BPE tokenizer on the bundled corpus and save a randomly initialised tiny Llama."""
    spec = spec or TinyModelSpec()
    tokenizer = train_bpe_tokenizer(bundled_corpus(), spec.vocab_size)
    return save_llama(Path(out), tokenizer, spec)


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--hidden-size", type=int, default=TinyModelSpec.hidden_size)
    parser.add_argument("--num-layers", type=int, default=TinyModelSpec.num_layers)
    parser.add_argument("--num-heads", type=int, default=TinyModelSpec.num_heads)
    parser.add_argument("--intermediate-size", type=int, default=TinyModelSpec.intermediate_size)
    parser.add_argument("--vocab-size", type=int, default=TinyModelSpec.vocab_size)
    parser.add_argument("--seed", type=int, default=TinyModelSpec.seed)
    args = parser.parse_args(argv)
    spec = TinyModelSpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
    )
    path = build_tiny_model(args.out, spec)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
