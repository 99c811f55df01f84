"""The trainer's configuration: one typed, validated pydantic model, read from YAML plus ``--set`` overrides.

This module imports no torch, so the command line can parse and check a config instantly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from online_dpo_protocol.models import LORA_RANKS


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class TrainConfig(BaseModel):
    """Online DPO against a generation server. Every key has a default except ``model``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # --- models ------------------------------------------------------------------------------------------
    model: str = Field(min_length=1)
    """Policy: a Hugging Face model folder (safetensors), or a GGUF file (`.gguf`, needs the `gguf` extra),
    which is dequantized once into a bf16 folder cached under `$ONLINE_DPO_CACHE` (default
    `~/.cache/online-dpo`) and trained from there. Also the reference unless `ref_model` is set. The server
    must have been started from the same folder or file (or with the same weights)."""
    ref_model: str | None = None
    """Reference model for the DPO loss: a folder or a GGUF file, as `model`; default: the initial
    `model`."""
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    """Torch device of the policy, the reference and a reward model (their precision: `precision`)."""

    # --- generation backend ------------------------------------------------------------------------------
    mode: Literal["server", "colocate"] = "server"
    """`server`: generate with the HTTP generation server at `server_url`. `colocate`: a vLLM engine inside
    the trainer process on the trainer's `device`, weights handed over in memory (trainer_client/colocate.py;
    the `colocate_*` keys below)."""
    server_url: str | list[str] = "http://127.0.0.1:8000"
    """Base URL of the generation server, or a list of the URLs of several replicas serving the same model:
    each step's prompts are split across them and every version is pushed to all (trainer_client/replicas.py).
    A one-URL list is that URL."""
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get("GENERATOR_API_KEY") or None, exclude=True, repr=False
    )
    """Bearer token of the server (its --api-key); default: `$GENERATOR_API_KEY`, the variable the server
    reads it from, which keeps it off command lines. Never written to checkpoints, summaries or logs."""
    request_timeout: float = Field(600.0, gt=0)
    """Seconds one HTTP request may take (a generate of a whole batch, a weight push)."""
    max_retries: int = Field(10, ge=0)
    """Retries of a request after a connection error, timeout or 5xx, with exponential backoff from 0.5 s
    up to 10 s apart (10 retries: about 1.5 minutes, enough for a small server to restart)."""
    server_restart_timeout: float = Field(600.0, ge=0)
    """Seconds a request keeps being retried, beyond `max_retries`, while the server cannot be reached or
    answers 503 (its engine restarting after a crash): the run waits that long for it, then puts its
    current weights back if the restarted server serves an older version, and goes on. 0 = `max_retries`
    only. With several `server_urls` it does not apply: a replica that is away is dropped after
    `max_retries`, the others take its prompts, and it is taken back when it answers again."""
    connect_timeout: float = Field(60.0, gt=0)
    """Seconds to wait at start-up for the server to answer /health before giving up."""
    push: Literal["auto", "http", "shared", "ipc", "stream"] = "auto"
    """How new weights reach the server (trainer_client/transports): `http` streams them in `PUT /weights`
    (works across hosts); `stream` sends the same body to the server's raw TCP port (its --stream-port;
    received without the HTTP server's copies, unencrypted); `shared` writes them under `shared_dir` and has
    the server read them with `POST /weights/load` (same host or shared volume; the folder must be inside
    the server's --checkpoint-root); `ipc` hands GPU buffers over by CUDA IPC (trainer and server on the same
    GPU: no host copy, no disk); `auto` picks `ipc` when the server says it runs on the trainer's GPU, else
    `stream` when the server has a stream port (`http` if it cannot be reached), else `http`."""
    ipc_bucket_mib: int = Field(1024, ge=1)
    """`push: ipc`: size of the GPU buffers the weights are packed into, in MiB (a larger tensor gets one of
    its own)."""
    shared_dir: str | None = None
    """`push: shared`: folder the trainer writes the weights into (the latest file stays, older go)."""
    shared_dir_on_server: str | None = None
    """`push: shared`: the same folder as the server sees it, if mounted elsewhere; default: `shared_dir`."""
    colocate_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    """`mode: colocate` on a GPU: fraction of the device the engine may take (weights, activations, KV
    cache); the policy, the reference and the optimizer must fit in the rest."""
    colocate_kv_cache_gib: int = Field(1, ge=1)
    """`mode: colocate` on CPU: KV cache of the engine in GiB."""
    colocate_sleep: bool = True
    """`mode: colocate` on a GPU: free the engine's memory (sleep level 1) while it is idle; no effect on CPU,
    where vLLM has no sleep mode."""
    colocate_dtype: str = "auto"
    """`mode: colocate`: dtype of the engine's copy of the weights (`auto` = the model folder's)."""
    colocate_max_model_len: int | None = Field(None, ge=1)
    """`mode: colocate`: context length of the engine; default: the model's."""
    colocate_enforce_eager: bool = True
    """`mode: colocate`: skip vLLM's torch.compile and CUDA graphs (faster start, slower generation)."""

    # --- data and reward ---------------------------------------------------------------------------------
    task: str = "arithmetic"
    """A built-in task name (`arithmetic`); reasoning-gym's procedural datasets, `reasoning-gym:NAME` or a mix
    `reasoning-gym:NAME,NAME` (reasoning-gym's names, e.g. `reasoning-gym:chain_sum`; needs the
    `reasoning-gym` extra; the `task_*`, `answer_format` and `system_prompt` keys); or rows of data: a JSONL,
    JSON, Parquet or CSV file, a folder of them (its files' names give the splits: train.parquet,
    test.parquet), or a Hub dataset `owner/name` or `owner/name:config` (needs a network). Each row holds a
    text prompt or a list of chat messages, and optionally an answer (the `*_field` keys name the columns).
    All but JSONL files need `datasets`."""
    prompt_field: str = Field("prompt", min_length=1)
    """Column of a row's prompt text."""
    messages_field: str = Field("messages", min_length=1)
    """Column of a row's chat messages ([{"role": ..., "content": ...}]), used where it is not null: rendered
    with the policy tokenizer's chat template and a generation prompt, as the server's
    /v1/chat/completions renders them (a model without a chat template cannot take such rows)."""
    answer_field: str = Field("answer", min_length=1)
    """Column of a row's answer, for `reward: task` (exact match of the completion's first line)."""
    eval_split: str | None = None
    """Split of the dataset held out for evaluation (e.g. `test`); default: the rows whose `split` column
    is `eval`, else the last `eval_fraction` of the rows."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of the rows held out when there is no eval split (rounded down; none held out: the
    evaluation uses the training rows)."""
    task_options: dict[str, Any] = Field(default_factory=dict)
    """`task: reasoning-gym:...` only. One dataset: its config, the keyword arguments of reasoning-gym's
    `create_dataset` (e.g. `{min_terms: 2, max_terms: 2, max_digits: 1}` for chain_sum). A mix: each
    dataset's name -> `{weight: w, <its config keys>}` (weights default to 1; the prompts of each epoch are
    split in proportion). `seed` and `size` are the task's own. Checked at load: unknown names and keys fail
    with their close matches."""
    task_train_size: int = Field(10_000, ge=1)
    """`task: reasoning-gym:...`: questions generated for the training pool (split across a mix by weight;
    held-out questions dropped), cycled through in epochs seeded by `seed`."""
    task_eval_size: int = Field(500, ge=1)
    """`task: reasoning-gym:...`: held-out questions (split across a mix by weight; repeats dropped),
    generated from a fixed seed, the same for every run seed; never in the training pool."""
    answer_format: Literal["last_line", "answer_tag"] = "last_line"
    """`task: reasoning-gym:...`: where the reward reads the answer, which the system prompt asks for.
    `last_line`: the completion's last non-empty line (a leading "Answer:" / "The answer is", bold and a
    trailing period stripped); easy for small models. `answer_tag`: the last `<answer>...</answer>`
    (reasoning-gym's own extraction; generation stops at `</answer>`)."""
    system_prompt: str | None = None
    """`task: reasoning-gym:...`: the system message of every prompt; default: the instruction of
    `answer_format` (trainer_client/tasks/reasoning_gym.py, SYSTEM_PROMPTS); an empty string sends none."""
    reward: str | list[str] = "task"
    """`task` (the task's own reward), `length`, a folder of a sequence-classification reward model, or
    `package.module:function`, a batch function `(prompts, completions, **row_fields) -> list[float]` that
    gets the rows' columns by name (importable from the working directory or PYTHONPATH); or a list of
    these, summed with `reward_weights`."""
    reward_weights: list[float] | None = None
    """Weight of each reward of the `reward` list in their sum; default: 1 each."""
    missing_eos_penalty: float = Field(0.0, ge=0)
    """Subtracted from the reward of a completion that did not finish (hit `max_new_tokens`)."""

    # --- sampling ----------------------------------------------------------------------------------------
    batch_size: int = Field(8, ge=1)
    """Prompts per step."""
    samples_per_prompt: int = Field(4, ge=2)
    """K completions per prompt; chosen = highest reward, rejected = lowest; all-tied prompts are skipped."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Completion length limit; default: the task's hint, else 64."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the training samples."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the training samples (1 = off)."""
    stop: list[str] | None = None
    """Stop strings; default: the task's hint."""

    # --- DPO ---------------------------------------------------------------------------------------------
    steps: int = Field(100, ge=1)
    """Optimizer steps (policy versions) to train for."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature: how strongly the policy is kept near the reference."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid` (DPO) or `ipo`."""
    learning_rate: float = Field(1e-6, gt=0)
    """AdamW peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup (`linear` and `cosine` decay to 0 at `steps`)."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to `learning_rate`."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient to this global norm; null = no clipping."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Pairs per forward/backward pass (gradient accumulation); default: all pairs of a step at once."""
    reference_ahead: bool = True
    """Score each batch and take the frozen reference's log-probabilities of its pairs in the producer
    thread, while the previous step trains, instead of inside the step. The step then runs only the
    policy; the reference's kernels interleave with it from the other thread (at online DPO's small shapes
    a step is bound by launching kernels, not by the card). In one process, with this project's own
    rewards: under torchrun, or with a reward function of your own (called in the main thread, where a
    `signal.alarm` timeout works), the reference stays in the step."""

    # --- learner: precision and memory (trainer_client/learner.py) ---------------------------------------
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`bf16`: forward and backward in bfloat16 (torch.autocast) with the weights, gradients and AdamW state
    in fp32, and the reference held in bf16. `fp32`: all in float32, TF32 off. `auto`: bf16 on CUDA, fp32
    elsewhere. The DPO log-probabilities are taken in fp32 from the logits either way."""
    gradient_checkpointing: bool = False
    """Recompute the policy's decoder layers in the backward pass instead of keeping their activations
    (transformers' own checkpointing): far less activation memory for about one more forward pass."""
    logprob_chunk_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Take the log-probabilities through the lm_head for the completion tokens only, this many at a time
    (with more than one chunk, recomputed in the backward pass), so the fp32 logits of all tokens (tokens x
    vocabulary: 16 GB for 64 sequences of 1280 tokens and a 49k vocabulary) never exist at once; 0 = the
    lm_head over every position at once. `auto`: chunks of at most 256 MiB of logits (1365 tokens for a 49k
    vocabulary), except on a GPU for a micro-batch whose whole logits fit in 256 MiB (the plain path there
    needs no host sync), and 0 with `cuda_graphs` (shapes read from the data) and for models whose logits
    are not the lm_head's output (Gemma 2/3's softcapping), where an explicit number is refused."""
    cuda_graphs: bool = False
    """Record the policy's forward and backward of each micro-batch shape, and the reference's forward, as
    CUDA graphs and replay them (one process on a GPU). At online DPO's small shapes a step is bound by
    launching its thousands of kernels; a graph launches them at once (the 300m demo's step: 0.084 s ->
    0.028 s on an H200). Micro-batches are padded to a few shapes (pairs and tokens each rounded up by at
    most half, with padding that changes no gradient), so activation memory can grow by up to 2.25x; each
    new shape costs one recording (about three eager micro-batches). Not with gradient_checkpointing or
    logprob_chunk_tokens. A model whose forward reads values back to the host cannot be recorded: set it
    false for such a model."""

    # --- LoRA (trainer_client/lora.py; needs the `lora` extra: peft) -------------------------------------
    lora_rank: int = Field(0, ge=0)
    """0: train every parameter (full fine-tuning). N > 0: freeze the model and train LoRA adapters of rank N
    (peft) on `lora_target_modules`: the base is held once, in the compute dtype (bf16 with `precision:
    bf16`), the reference is that base with the adapters switched off (no second copy), and only the
    adapters have gradients and AdamW state. Checkpoints hold the adapters (peft's folder, loadable by
    `PeftModel.from_pretrained`); `trainer-client merge-lora` makes a plain model folder of one. One process
    only (not under torchrun), and not with `cuda_graphs`."""
    lora_alpha: float | None = Field(None, gt=0)
    """LoRA's scale numerator: an adapter adds `lora_alpha / lora_rank * B @ A` to each target weight;
    default: 2 x `lora_rank` (a scale of 2)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input in the policy's training forward (never in the reference's, nor in
    generation)."""
    lora_target_modules: list[str] | None = None
    """Names (last parts, e.g. `[q_proj, v_proj]`) of the linear layers that get adapters; default: every
    linear projection of the decoder blocks (peft's `all-linear`: not the output head)."""
    lora_sync: Literal["adapter", "merged"] = "adapter"
    """What a push sends with `lora_rank > 0`. `adapter`: only the adapters' tensors (tens of MB at 8B, by
    `http` or `stream`), for a server started with `--enable-lora --max-lora-rank N` (N >= `lora_rank`),
    which serves the base plus the latest adapter; `merged`: the base with the adapters merged in, every
    tensor, as full fine-tuning pushes them, for a server without LoRA (or a model vLLM's LoRA does not
    cover)."""
    save_merged: bool = False
    """`lora_rank > 0`: at the end of the run also write `output_dir/merged`, the policy with its adapters
    merged into the base: a plain model folder, what `trainer-client merge-lora` makes of a checkpoint."""

    # --- several ranks: torchrun + FSDP2 (trainer_client/distributed.py) ---------------------------------
    dist_timeout_seconds: float = Field(600.0, gt=0)
    """Under torchrun: the longest any rank waits in one collective operation before it gives up with an
    error naming itself (a rank that dies is noticed at once; this bounds a hung one). The other ranks wait
    for rank 0's next command while rank 0 generates and pushes, so keep it above the longest step."""
    gather_bucket_mib: int = Field(256, ge=1)
    """Under torchrun: full tensors are gathered on rank 0 for a push or a checkpoint this many MiB at a time
    (a larger tensor alone); rank 0 holds one such bucket beside the pushed copy, never the whole model."""

    # --- asynchrony --------------------------------------------------------------------------------------
    max_staleness: int = Field(1, ge=0)
    """0 = synchronous on-policy; N >= 1 = a batch may come from a policy up to N versions older than the
    one being trained (generation of the next batch overlaps training)."""
    gil_switch_ms: float | None = Field(0.5, gt=0)
    """Python's thread switch interval during a run, in ms (`sys.setswitchinterval`; null keeps Python's
    5 ms). The training thread launches GPU kernels almost without pause, and the producer and pusher
    threads take the GIL back several times within each HTTP request; a short interval lets them in
    sooner (docs/BENCHMARKS.md, section 7)."""

    # --- held-out evaluation during the run --------------------------------------------------------------
    eval_every: int = Field(0, ge=0)
    """Every N steps, and before the first and after the last, the greedy held-out reward of the served
    policy (all of the task's held-out prompts, scored by the run's `reward`: with `reward: task` and a
    0/1 verifier, the accuracy), written to `eval.jsonl` in `output_dir` with the training time so far.
    The loop and the producer pause meanwhile, so the evaluation's time is in no step's time. 0 = never."""

    # --- output ------------------------------------------------------------------------------------------
    output_dir: str = "runs/online-dpo"
    """Folder for metrics.jsonl and checkpoints."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0 = only at the end; the end is always saved)."""
    log_every: int = Field(0, ge=0)
    """Also print a metrics line to the console every N steps (0 = progress bar only)."""
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Also log the metrics.jsonl keys to TensorBoard (event files under `output_dir`/tensorboard; needs the
    `tensorboard` package) and/or Weights & Biases (needs `wandb`; its WANDB_* variables apply)."""
    progress_bar: bool = True
    """Show a tqdm progress bar with live reward, loss and step time."""
    seed: int = 0
    """Seed of prompt order, generation seeds and torch."""

    @field_validator("server_url")
    @classmethod
    def _check_server_urls(cls, value: str | list[str]) -> str | list[str]:
        urls = [value] if isinstance(value, str) else value
        bad = [url for url in urls if not re.match(r"^https?://", url)]
        if not urls or bad:
            raise ValueError(f"expected http:// or https:// URLs, got {bad or 'an empty list'}")
        if len(set(urls)) < len(urls):
            raise ValueError(f"lists a server twice: {urls}")
        return urls[0] if len(urls) == 1 else urls

    @property
    def server_urls(self) -> list[str]:
        """`server_url` as a list (one URL or several replicas)."""
        return [self.server_url] if isinstance(self.server_url, str) else list(self.server_url)

    @property
    def reward_names(self) -> list[str]:
        """`reward` as a list."""
        return [self.reward] if isinstance(self.reward, str) else list(self.reward)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_sink_or_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.push == "shared" and not self.shared_dir:
            raise ValueError("push: shared needs shared_dir (a folder the server can read)")
        if self.cuda_graphs and (self.gradient_checkpointing or self.logprob_chunk_tokens not in (0, "auto")):
            raise ValueError(
                "cuda_graphs: not with gradient_checkpointing or logprob_chunk_tokens (recomputation, and "
                "shapes read from the data); turn those off or set cuda_graphs: false"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})")
        self._check_lora_keys()
        self._check_task_keys()
        rewards = self.reward_names
        if not rewards:
            raise ValueError("reward: the list is empty")
        if self.reward_weights is not None and len(self.reward_weights) != len(rewards):
            raise ValueError(
                f"reward_weights: {len(self.reward_weights)} weights for {len(rewards)} rewards {rewards}"
            )
        return self

    @property
    def lora_scale_alpha(self) -> float:
        """`lora_alpha`, or its default (2 x `lora_rank`)."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def _check_lora_keys(self) -> None:
        """LoRA's keys do nothing without `lora_rank`, and some combinations are refused here, before any
        model is loaded (torchrun is refused by the learner, which knows the number of ranks)."""
        if not self.lora_rank:
            default = {k: TrainConfig.model_fields[k].get_default() for k in LORA_KEYS}
            changed = [key for key in LORA_KEYS if getattr(self, key) != default[key]]
            if changed:
                raise ValueError(f"{changed} apply only with lora_rank > 0 (LoRA); lora_rank is 0")
            return
        if self.cuda_graphs:
            raise ValueError(
                "cuda_graphs: not with lora_rank > 0: the reference is the policy with its adapters "
                "switched off, a switch a recorded graph cannot follow, and graphs of peft's layers are not "
                "checked on a GPU; set cuda_graphs: false (at LoRA's usual sizes a step is bound by the "
                "card, not by launching kernels)"
            )
        if self.lora_sync == "adapter" and self.lora_rank > LORA_RANKS[-1]:
            raise ValueError(
                f"lora_rank {self.lora_rank} is over {LORA_RANKS[-1]}, the largest LoRA rank vLLM serves,"
                " which lora_sync: adapter needs: take a smaller rank, or lora_sync: merged (full weights)"
            )
        if self.lora_sync == "adapter" and self.push in ("ipc", "shared"):
            raise ValueError(
                f"push: {self.push} carries whole models only; with lora_rank > 0 and lora_sync: adapter an "
                "adapter (tens of MB) goes by push: http or stream (or auto), or set lora_sync: merged"
            )
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules: the list is empty (null: every linear projection)")

    def _check_task_keys(self) -> None:
        """A reasoning-gym task's datasets and options are checked now (importing reasoning-gym, about 2 s),
        so a misspelt name or config key fails before any model is loaded; elsewhere its keys must be unset,
        since they would silently do nothing."""
        from trainer_client.tasks.reasoning_gym import check, is_reasoning_gym

        if is_reasoning_gym(self.task):
            check(self.task, self.task_options)
            return
        default = {k: TrainConfig.model_fields[k].get_default(call_default_factory=True) for k in GYM_KEYS}
        changed = [key for key in GYM_KEYS if getattr(self, key) != default[key]]
        if changed:
            raise ValueError(f"{changed} apply only to `task: reasoning-gym:NAME`; task is {self.task!r}")


LORA_KEYS = ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_sync", "save_merged")
"""The keys that only LoRA (`lora_rank > 0`) reads."""
GYM_KEYS = ("task_options", "task_train_size", "task_eval_size", "answer_format", "system_prompt")
"""The keys of a reasoning-gym task."""


def _format_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as YAML (``3`` -> int, ``null`` -> None, ``[a, b]`` -> list)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value")
    if key not in TrainConfig.model_fields:
        raise ConfigError(f"{key}: unknown key (from --set {item})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> TrainConfig:
    """Read a YAML config file (optional) over ``base`` (keys given by other means), apply ``key=value``
    overrides, and validate.

    Raises :class:`ConfigError` with a message naming each bad key."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of key: value")
        data.update(loaded or {})
    for item in overrides:
        key, value = parse_override(item)
        data[key] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None
