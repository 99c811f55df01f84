"""Asynchronous online DPO against a generation server, in one file.

The algorithm of "Asynchronous RLHF" (Noukhovitch et al., ICLR 2025): a producer thread asks the server for
the next batch while the trainer trains on the current one, so generation and training overlap and the
data is at most ``max_staleness`` policy versions old.

Versions. Policy version ``p`` is the policy after ``p`` optimizer steps (``p = 0`` is ``config.model``).
Step ``s`` trains version ``s - 1`` into version ``s`` and then pushes it. Its batch must come from version
``>= s - 1 - max_staleness``: with 0 that is the very policy being trained (synchronous, on-policy); with
``N`` generation may run up to ``N`` versions ahead. The server serves policy version ``p`` as server version
``p + version_offset``: 0 when the server starts fresh from ``config.model`` for a fresh run (so after step
``s`` the server reports version ``s``); otherwise (a resumed run, or a server that already served a higher
version) the trainer pushes its current policy first, as the lowest version the server accepts that is
``>= start_step``, and keeps that offset. Metrics report policy versions, so a resumed run writes the same
metrics whatever the server's history.

Threads:
    producer (generate batch s, after the push it needs)  -> queue ->  trainer (score, pair, DPO step)
    (with ``reference_ahead`` the producer also scores, pairs and takes the reference's log-probabilities)
    trainer (snapshot of version s)  -> pusher (push in order, by the backend's weight transport)
The metrics line of step s is written once version s is served (it reports the push time too).

The models, their precision, the ranks and the DPO step itself are the learner's (learner.py); the producer
and pusher threads are in workers.py; this file is the loop. Under torchrun only rank 0 runs it: the other
ranks follow rank 0's learner (``learner.follow()``), which hands them each step's pairs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from trainer_client.backends import make_backend
from trainer_client.checkpoint import checkpoint_dir
from trainer_client.client import Completion
from trainer_client.config import TrainConfig
from trainer_client.dpo import apply_missing_eos_penalty, build_pairs
from trainer_client.evaluate import EVAL_REQUEST_PROMPTS
from trainer_client.generation import GenerationBackend, GenerationBatch, IncompatibleServerError
from trainer_client.learner import Learner, NotFiniteError, StepStats
from trainer_client.metrics_log import METRICS_FILE, MetricsLog
from trainer_client.replicas import replica_metrics
from trainer_client.rewards import build_reward, runs_in_any_thread
from trainer_client.tasks import DataFields, GymSettings, load_task, task_hint
from trainer_client.workers import Batch, Producer, Pusher

__all__ = ["METRICS_FILE", "IncompatibleServerError", "NotFiniteError", "run_training"]
log = logging.getLogger("trainer_client")


def sampling_params(c: TrainConfig, task) -> dict:
    """The sampling arguments of every generate request."""
    return dict(
        max_tokens=c.max_new_tokens or task_hint(task, "max_new_tokens") or 64,
        temperature=c.temperature,
        top_p=c.top_p,
        stop=c.stop if c.stop is not None else task_hint(task, "stop"),
    )


def check_takes_adapters(backend: GenerationBackend, rank: int, where: str) -> None:
    """Raise :class:`IncompatibleServerError` unless the backend takes LoRA adapters of rank ``rank``."""
    limit = backend.max_lora_rank()
    if limit is None:
        raise IncompatibleServerError(
            f"{where} takes no LoRA adapters (lora_sync: adapter): start it with --enable-lora "
            f"--max-lora-rank {max(16, rank)}, or set lora_sync: merged to push whole weights with the "
            "adapters merged in"
        )
    if rank > limit:
        raise IncompatibleServerError(
            f"lora_rank {rank} is over the --max-lora-rank {limit} of {where}: restart it with a larger "
            "--max-lora-rank, or lower lora_rank"
        )
    if backend.base_version():
        raise IncompatibleServerError(
            f"{where} serves whole weights pushed as version {backend.base_version()}, not those of its "
            "--model, and an adapter would be served on them: restart it from the model this run trains "
            "(or set lora_sync: merged)"
        )


def check_compatible(
    server_tensors: dict[str, tuple[list[int], str]], ours: dict[str, tuple[list[int], int]], where: str
) -> list[str]:
    """The names to push: the server's tensor names. Raise if they do not match the policy's tensors
    (``ours``: name -> (shape, storage key), as ``Learner.tensor_specs`` gives them)."""
    missing = [n for n in server_tensors if n not in ours]
    shapes = [
        f"{n}: server {list(s)} vs policy {ours[n][0]}"
        for n, (s, _) in server_tensors.items()
        if n in ours and list(s) != ours[n][0]
    ]
    served = {ours[n][1] for n in server_tensors if n in ours}  # a tied tensor need not be served twice
    extra = [n for n, (_, storage) in ours.items() if n not in server_tensors and storage not in served]
    problems = []
    for label, names in (("missing in the policy", missing), ("not served", extra), ("shape", shapes)):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            problems.append(f"{label}: {', '.join(names[:3])}{more}")
    if problems:
        raise IncompatibleServerError(
            f"{where} does not serve the policy's architecture; " + "; ".join(problems)
        )
    return list(server_tensors)


# ----------------------------------------------------------------------------------------------------------
# Scores and metrics
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Scored:
    """A batch's B*K samples (prompt-major), their rewards and the preference pairs built from them."""

    flat: list[Completion]  # (B*K,)
    rewards: list[float]  # (B*K,) after the missing-EOS penalty
    finished: list[bool]  # (B*K,) ended by EOS or a stop string
    pairs: list[tuple[int, int, int]]  # [(prompt b, chosen k, rejected k)]
    skipped_ties: int  # prompts whose K rewards are all equal
    seconds: float  # scoring them
    reference: torch.Tensor | None = None  # (P, 2) the reference's log-probabilities of the pairs, if ahead
    reference_seconds: float = 0.0


def score(samples: GenerationBatch, reward_fn, c: TrainConfig) -> Scored:
    t0 = time.monotonic()
    K = c.samples_per_prompt
    flat = [cmp for row in samples.completions for cmp in row]  # (B*K,)
    prompts_flat = [p for p in samples.prompts for _ in range(K)]
    raw_rewards = reward_fn(prompts_flat, [cmp.text for cmp in flat])
    finished = [cmp.finish_reason == "stop" for cmp in flat]
    rewards = apply_missing_eos_penalty(raw_rewards, finished, c.missing_eos_penalty)
    pairs, skipped_ties = build_pairs(rewards, K)
    return Scored(flat, rewards, finished, pairs, skipped_ties, seconds=time.monotonic() - t0)


def server_timing_metrics(samples: GenerationBatch) -> dict:
    """``gen_server_seconds`` (the server's engine on this batch) and ``gen_weights_wait_seconds`` (the
    request waiting on the server for a reload to let go of the weights), when the server says."""
    t = samples.server_timing
    if t is None:
        return {}
    return {
        "gen_server_seconds": round(t["generate_seconds"], 4),
        "gen_weights_wait_seconds": round(t["weights_wait_seconds"], 4),
    }


def step_metrics(step: int, batch: Batch, scored: Scored, stats: StepStats, K: int) -> dict:
    """The metrics line of ``step``, timings aside."""
    rewards, pairs = scored.rewards, scored.pairs
    return {
        "step": step,
        "version": step,
        "batch_weights_version": batch.policy_version,
        "staleness": (step - 1) - batch.policy_version,
        "reward_mean": mean(rewards),
        "reward_chosen": mean(rewards[b * K + kc] for b, kc, _ in pairs),
        "reward_rejected": mean(rewards[b * K + kr] for b, _, kr in pairs),
        "loss": stats.loss,
        "kl": stats.kl,
        "reward_accuracy": stats.reward_accuracy,
        "logratio_margin": stats.logratio_margin,
        "pairs": len(pairs),
        "skipped_ties": scored.skipped_ties,
        "finished_fraction": mean(scored.finished),
        "completion_tokens": mean(len(cmp.token_ids) for cmp in scored.flat),
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
    }


def held_out_eval(backend: GenerationBackend, prompts: list[str], reward_fn, sampling: dict) -> dict:
    """Greedy completions of ``prompts`` (the task's held-out ones) from what the backend serves, scored by
    ``reward_fn`` (the run's reward; with ``reward: task`` what ``trainer-client eval`` measures):
    ``eval_reward`` (the accuracy, for a 0/1 verifier), ``eval_finished`` (ended before the length limit),
    and the versions they came from."""
    t0 = time.monotonic()
    completions, versions = [], set()
    for i in range(0, len(prompts), EVAL_REQUEST_PROMPTS):  # (as `trainer-client eval` splits them)
        out = backend.generate(
            prompts[i : i + EVAL_REQUEST_PROMPTS], n=1, max_tokens=sampling["max_tokens"], temperature=0.0,
            seed=None, stop=sampling["stop"],
        )  # fmt: skip
        completions += [row[0] for row in out.completions]
        versions.add(out.weights_version)
    rewards = reward_fn(prompts, [c.text for c in completions])
    return {
        "eval_reward": mean(rewards),
        "eval_finished": mean(c.finish_reason == "stop" for c in completions),
        "eval_prompts": len(prompts),
        "eval_completion_tokens": mean(len(c.token_ids) for c in completions),
        "eval_weights_versions": sorted(versions),
        "eval_seconds": round(time.monotonic() - t0, 4),
    }


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def run_training(
    config: TrainConfig, resume: str | None = None, on_step=None, backend: GenerationBackend | None = None
) -> dict:
    """Train for ``config.steps`` steps (continuing from checkpoint folder ``resume``); returns a summary.

    ``on_step(record)``, if given, is called in the training thread after every step. ``backend``, if
    given, is used instead of one built from the config and left open (the caller closes it); the colocated
    demo evaluates on its engine before and after, since a GPU process cannot build a second engine with
    sleep mode after closing one (vLLM 0.26)."""
    c = config
    torch.manual_seed(c.seed)
    hf_logging.disable_progress_bar()  # ours is the only progress bar (no "Loading weights" bars)
    learner = Learner(c, resume)  # models and optimizer (restored from `resume`); under torchrun, sharded

    with ExitStack() as cleanup:  # on any exit: threads stopped, files and connections closed
        if c.gil_switch_ms is not None:  # (Python's own interval again after the run)
            cleanup.callback(sys.setswitchinterval, sys.getswitchinterval())
            sys.setswitchinterval(c.gil_switch_ms / 1000)
        cleanup.push(lambda _type, error, _tb: learner.close(error))  # (tells the other ranks to stop)
        if not learner.is_main:
            learner.follow()  # a rank other than 0 does what rank 0's learner asks, until it stops
            return {"rank": learner.rank, "steps": c.steps, "start_step": None}

        # --- setup: data, reward, output ------------------------------------------------------------------
        start_step = learner.step
        if start_step >= c.steps:
            raise ValueError(
                f"checkpoint {resume} is at step {start_step}; nothing left to do for steps={c.steps}"
            )
        fields = DataFields(c.prompt_field, c.messages_field, c.answer_field, c.eval_split, c.eval_fraction)
        gym = GymSettings.of_config(c)  # (chat rows and reasoning-gym prompts: the policy's chat template)
        task = load_task(c.task, fields, tokenizer=learner.tokenizer, gym=gym)
        reward_fn = build_reward(c.reward, task, device=learner.device, weights=c.reward_weights)
        sampling = sampling_params(c, task)
        out = Path(c.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        resumed_at = start_step if resume else None  # metrics.jsonl, then the report_to sinks
        metrics = MetricsLog(out, c.report_to, resumed_at, config=c.model_dump())
        cleanup.callback(metrics.close)
        if backend is None:
            backend = make_backend(c)
            cleanup.callback(backend.close)

        # --- the server: reachable? same architecture? which version offset? -------------------------------
        if hasattr(backend, "wait_until_ready"):
            backend.wait_until_ready(c.connect_timeout)
        server_version, server_tensors = backend.weights_spec()
        where = f"the server at {', '.join(c.server_urls)}"
        push_names = check_compatible(server_tensors, learner.tensor_specs(), where)
        offset = 0 if (start_step == 0 and server_version == 0) else max(0, server_version + 1 - start_step)
        served_dtypes = {n: server_tensors[n][1] for n in push_names}
        adapters = learner.lora and c.lora_sync == "adapter"  # (LoRA: pushes of the adapters alone)
        if adapters:
            check_takes_adapters(backend, c.lora_rank, where)
            served_float = next(d for d in served_dtypes.values() if d.startswith(("float", "bfloat")))

        def snapshot():  # a copy the optimizer will not modify while it is pushed, in the served dtypes
            learner.check_finite("lower learning_rate and resume from the last checkpoint")
            if adapters:
                tensors, config = learner.adapter_weights()
                return backend.snapshot(tensors, dict.fromkeys(tensors, served_float), adapter=config)
            return backend.snapshot(learner.full_weights(served_dtypes), served_dtypes)

        # the producer thread scores the batches and takes the reference's log-probabilities of their pairs
        # (one process, and rewards of this project's own: a user's function is called in this thread)
        ahead = c.reference_ahead and learner.reference_ahead and runs_in_any_thread(c.reward)

        def prepare(samples: GenerationBatch) -> Scored:  # in the producer thread, behind the previous step
            scored = score(samples, reward_fn, c)
            if scored.pairs:
                t0 = time.monotonic()
                scored.reference = learner.reference_pair_logps(samples, scored.pairs)
                scored.reference_seconds = time.monotonic() - t0
            return scored

        pusher = Pusher(backend, offset, served=start_step, max_pending=backend.max_pending)
        cleanup.callback(pusher.abort)
        if offset or start_step:
            log.info(
                "server at version %d: policy %d goes up as %d",
                server_version,
                start_step,
                start_step + offset,
            )
            pusher.push_now(start_step, snapshot())  # before the producer starts: it needs this version
        train_intervals: list[tuple[float, float]] = []  # when the trainer was busy, for the overlap measure
        last_checkpoint, checkpoint_seconds = None, 0.0
        train_seconds_so_far = 0.0  # the steps' wall time: what an accuracy-against-time curve plots
        evals = (out / "eval.jsonl").open("a" if resume else "w") if c.eval_every else None
        if evals is not None:
            cleanup.callback(evals.close)

        def evaluate(step: int) -> float:  # held-out reward of policy `step` (served), producer paused
            with producer.paused() if producer is not None else nullcontext():
                t0 = time.monotonic()
                pusher.wait_served(step)
                result = {"step": step, "train_seconds": round(train_seconds_so_far, 3)}
                result |= held_out_eval(backend, task.eval_prompts(), reward_fn, sampling)
                evals.write(json.dumps(result) + "\n")
                evals.flush()
                log.info("held-out reward at step %d: %.4f", step, result["eval_reward"])
                return time.monotonic() - t0

        producer = None
        if evals is not None and start_step == 0:  # (before the producer starts: its first batch would wait)
            evaluate(0)
        producer = Producer(
            c, task, backend, pusher, start_step + 1, c.steps, sampling, prepare=prepare if ahead else None
        )
        cleanup.callback(producer.stop.set)
        bar = cleanup.enter_context(
            tqdm(
                total=c.steps,
                initial=start_step,
                desc="online-dpo",
                disable=not c.progress_bar,
                dynamic_ncols=True,
            )
        )

        loop_start = step_end = time.monotonic()
        for step in range(start_step + 1, c.steps + 1):
            # --- 1. the batch (generated ahead by the producer) ---------------------------------------------
            wait_start = time.monotonic()
            batch = producer.get(pusher)
            busy_start, busy_cpu_start = time.monotonic(), time.thread_time()
            if not 0 <= (step - 1) - batch.policy_version <= c.max_staleness:
                raise RuntimeError(f"step {step} got a batch of policy version {batch.policy_version}")
            samples = batch.samples

            # --- 2. score: rewards of the B*K samples, missing-EOS penalty, pairs (ahead: by the producer, --
            #        with the reference's log-probabilities of the pairs)
            scored: Scored = batch.prepared or score(samples, reward_fn, c)

            # --- 3. one DPO optimizer step on the pairs: policy version step-1 -> step ----------------------
            stats = learner.train_step(samples, scored.pairs, scored.reference)

            # --- 4. push policy version `step` in the background, log its metrics once served ---------------
            weights = snapshot()
            train_end, train_cpu = time.monotonic(), time.thread_time() - busy_cpu_start
            train_intervals = train_intervals[-c.max_staleness - 1 :] + [(busy_start, train_end)]
            record = (
                step_metrics(step, batch, scored, stats, c.samples_per_prompt)
                | {
                    # timings: *_seconds, the only fields that differ between identical runs
                    "gen_seconds": round(batch.gen_end - batch.gen_start, 4),
                    "score_seconds": round(scored.seconds, 4),  # (ahead: in the producer thread)
                    "reference_seconds": round(scored.reference_seconds, 4),  # (0: inside the step)
                    "train_seconds": round(train_end - busy_start, 4),
                    # the training thread's own CPU time in it; the rest it was not running (the GIL, a lock,
                    # a non-spinning wait, no free core, torch's intra-op threads working for it)
                    "train_cpu_seconds": round(train_cpu, 4),
                    "wait_seconds": round(busy_start - wait_start, 4),  # trainer idle, waiting for the batch
                    "overlap_seconds": round(  # generation of this batch hidden behind earlier training
                        sum(overlap((batch.gen_start, batch.gen_end), iv) for iv in train_intervals[:-1]), 4
                    ),
                    "wall_seconds": round(train_end - step_end, 4),
                }
                | server_timing_metrics(samples)  # one server: generating, or waiting behind a push
                | replica_metrics(samples, offset)  # several generation replicas: what each did
                | learner.memory_metrics()
            )
            pusher.submit(step, weights, record)
            metrics.add(record)
            metrics.flush(pusher.served)
            if on_step is not None:
                on_step(record)
            loss = f"{stats.loss:.4f}" if stats.loss is not None else "n/a"
            bar.set_postfix_str(
                f"reward={record['reward_mean']:.3f}, loss={loss}, step_s={record['wall_seconds']:.2f}",
                refresh=False,
            )
            bar.update(1)
            if c.log_every and step % c.log_every == 0:
                tqdm.write(json.dumps(record))

            # --- 5. checkpoint (after the push, so its metrics line is on disk first) -----------------------
            if step == c.steps or (c.checkpoint_every and step % c.checkpoint_every == 0):
                t0 = time.monotonic()
                pusher.wait_served(step)
                metrics.flush(pusher.served)
                extra = {"config": c.model_dump(), "version_offset": offset}
                last_checkpoint = learner.save_checkpoint(checkpoint_dir(out, step), extra)
                checkpoint_seconds += time.monotonic() - t0
            train_seconds_so_far += record["wall_seconds"]
            paused = 0.0
            if evals is not None and (step % c.eval_every == 0 or step == c.steps):
                paused = evaluate(step)  # (not in the next step's wall time)
            step_end = time.monotonic() - paused
        pusher.close()
        metrics.flush(pusher.served)
        merged = None
        if learner.lora and c.save_merged:  # (lora.py: the final checkpoint's adapters in the base)
            from trainer_client.lora import merge_checkpoint

            merged = merge_checkpoint(last_checkpoint, out / "merged", base=c.model)
            log.info("merged model written to %s", merged)
    return {
        "rank": 0,
        "steps": c.steps,
        "start_step": start_step,
        "output_dir": str(out),
        "metrics_path": str(metrics.path),
        "final_checkpoint": str(last_checkpoint),
        "merged_model": None if merged is None else str(merged),
        "version_offset": offset,
        "server_version": c.steps + offset,
        "wall_seconds": round(time.monotonic() - loop_start, 3),
        "checkpoint_seconds": round(checkpoint_seconds, 3),
    }
