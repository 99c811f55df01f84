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
    producer (generate batch s, after the push it needs)  -> queue ->  trainer (score, pair, loss, step)
    trainer (snapshot of version s)  -> pusher (push in order, by the backend's weight transport)
The metrics line of step s is written once version s is served (it reports the push time too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from trainer_client.backends import GenerationBackend, GenerationBatch, make_backend
from trainer_client.checkpoint import checkpoint_dir, load_trainer_state, save_checkpoint
from trainer_client.config import TrainConfig
from trainer_client.dpo import apply_missing_eos_penalty, build_pairs, collate, dpo_loss, token_logps
from trainer_client.rewards import build_reward
from trainer_client.tasks import load_task, task_hint

log = logging.getLogger("trainer_client")
METRICS_FILE = "metrics.jsonl"


class NotFiniteError(RuntimeError):
    """A loss, gradient norm or weight is NaN or infinite: the trainer stops before it applies or pushes it,
    so the server keeps serving the last finite weights."""


class IncompatibleServerError(RuntimeError):
    """The server serves a model whose tensor names or shapes differ from the policy's."""


def generation_seed(seed: int, step: int) -> int:
    """The sampling seed of step ``step``: a pure function of ``(seed, step)``, so a resumed run resamples
    exactly what the uninterrupted run sampled."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def check_compatible(server_tensors: dict[str, tuple[list[int], str]], policy, where: str) -> list[str]:
    """The names to push: the server's tensor names. Raise if they do not match the policy's tensors."""
    ours = policy.state_dict()
    missing = [n for n in server_tensors if n not in ours]
    shapes = [
        f"{n}: server {list(s)} vs policy {list(ours[n].shape)}"
        for n, (s, _) in server_tensors.items()
        if n in ours and list(s) != list(ours[n].shape)
    ]
    served = {ours[n].data_ptr() for n in server_tensors if n in ours}
    extra = [n for n, t in ours.items() if n not in server_tensors and t.data_ptr() not in served]
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


def check_finite(state_dict: dict[str, torch.Tensor], advice: str) -> None:
    """Raise :class:`NotFiniteError` naming the tensors that hold NaN or Inf (one device sync if none do)."""
    floats = [n for n, t in state_dict.items() if t.is_floating_point()]
    finite = [torch.isfinite(state_dict[n]).all() for n in floats]
    if finite and not bool(torch.stack(finite).all()):
        bad = [n for n, ok in zip(floats, finite, strict=True) if not ok]
        names = ", ".join(bad[:3])
        raise NotFiniteError(f"the policy's weights hold NaN or Inf ({names}), not pushed; {advice}")


# ----------------------------------------------------------------------------------------------------------
# Background threads: the producer of batches and the pusher of weights
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    step: int
    policy_version: int  # the policy version that sampled it
    samples: GenerationBatch
    gen_start: float  # time.monotonic() interval of the generate request
    gen_end: float


class Pusher:
    """Pushes weight snapshots in order from a background thread; wakes whoever waits for a version.

    ``submit`` returns at once unless ``max_pending`` snapshots already wait (then training waits, so memory
    stays bounded). Each push sets ``push_seconds`` in the metrics record submitted with it."""

    def __init__(self, backend: GenerationBackend, offset: int, served: int, max_pending: int = 2):
        self.backend, self.offset = backend, offset
        self.served = served  # highest policy version known to be served
        self.server_version = served + offset  # the server version we last put there
        self.latest: tuple[int, dict] | None = None  # (policy version, snapshot) last pushed
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.push_lock = threading.Lock()  # one PUT at a time (normal pushes and re-pushes)
        self.todo: queue.Queue = queue.Queue(maxsize=max_pending)
        self.thread = threading.Thread(target=self._run, name="pusher", daemon=True)
        self.thread.start()

    def push_now(self, version: int, snapshot: dict, record: dict | None = None) -> None:
        """Push ``snapshot`` as policy ``version`` from the calling thread (``record["push_seconds"]`` is set
        before anyone learns that the version is served)."""
        t0 = time.monotonic()
        with self.push_lock:
            self.backend.push(snapshot, version + self.offset)
            self.latest = (version, snapshot)
            self.server_version = version + self.offset
        if record is not None:
            record["push_seconds"] = round(time.monotonic() - t0, 4)
        with self.cond:
            self.served = max(self.served, version)
            self.cond.notify_all()

    def repush_latest(self) -> None:
        """After a server restart: put the last pushed weights back (a restarted server serves version 0)."""
        with self.push_lock:
            if self.latest is not None:
                version, snapshot = self.latest
                self.backend.push(snapshot, version + self.offset)

    def submit(self, version: int, snapshot: dict, record: dict) -> None:
        self._put((version, snapshot, record))

    def wait_served(self, version: int, stop: threading.Event | None = None) -> bool:
        """Block until policy ``version`` is served; False if ``stop`` was set first."""
        with self.cond:
            while self.served < version:
                self.raise_if_failed()
                if stop is not None and stop.is_set():
                    return False
                self.cond.wait(0.5)
        return True

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait until every submitted snapshot is pushed."""
        self._put(None)
        self.thread.join()
        self.raise_if_failed()

    def abort(self) -> None:
        """Let the thread end after its current push (whatever else is queued is dropped)."""
        while True:
            try:
                self.todo.get_nowait()
            except queue.Empty:
                break
        self.todo.put_nowait(None)

    def _put(self, item) -> None:
        while True:
            self.raise_if_failed()
            try:
                return self.todo.put(item, timeout=0.5)
            except queue.Full:
                continue

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            try:
                self.push_now(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return


class Producer:
    """Generates the batches of steps ``first..last`` in order, each after the push it needs is served."""

    def __init__(self, config: TrainConfig, task, backend, pusher: Pusher, first: int, last: int, sampling):
        self.config, self.task, self.sampling = config, task, sampling
        self.backend, self.pusher = backend, pusher
        self.steps = range(first, last + 1)
        self.batches: queue.Queue[Batch] = queue.Queue()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for step in self.steps:
                # bounded staleness: batch s may come from version s-1-max_staleness at the oldest
                oldest = max(0, step - 1 - self.config.max_staleness)
                if not self.pusher.wait_served(oldest, self.stop):
                    return
                self.batches.put(self._generate(step, oldest))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self.error = e

    def _generate(self, step: int, oldest: int) -> Batch:
        c = self.config
        prompts = self.task.train_prompts(step, c.batch_size, c.seed)
        while True:
            t0 = time.monotonic()
            samples = self.backend.generate(
                prompts, n=c.samples_per_prompt, seed=generation_seed(c.seed, step), **self.sampling
            )
            t1 = time.monotonic()
            pushed = self.pusher.server_version
            if samples.weights_version < pushed and self.backend.version() < pushed:
                # The server went back to an older version: it restarted. Put our weights back, resample.
                log.warning(
                    "server restarted (version %d < %d); pushing weights again",
                    samples.weights_version,
                    pushed,
                )
                self.pusher.repush_latest()
                continue
            version = samples.weights_version - self.pusher.offset
            if version < oldest:
                raise RuntimeError(
                    f"server answered with version {samples.weights_version}, older than allowed"
                )
            return Batch(step, version, samples, t0, t1)

    def get(self, pusher: Pusher) -> Batch:
        while True:
            if self.error is not None:
                raise self.error
            pusher.raise_if_failed()
            try:
                return self.batches.get(timeout=0.5)
            except queue.Empty:
                continue


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


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
    out = Path(c.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(c.seed)
    hf_logging.disable_progress_bar()  # ours is the only progress bar (no "Loading weights" bars)

    # --- setup: data, reward, models, optimizer ----------------------------------------------------------
    task = load_task(c.task)
    reward_fn = build_reward(c.reward, task, device=c.device)
    sampling = dict(
        max_tokens=c.max_new_tokens or task_hint(task, "max_new_tokens") or 64,
        temperature=c.temperature,
        top_p=c.top_p,
        stop=c.stop if c.stop is not None else task_hint(task, "stop"),
    )
    tokenizer = AutoTokenizer.from_pretrained(c.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(resume or c.model, dtype=torch.float32).to(c.device)
    reference = AutoModelForCausalLM.from_pretrained(c.ref_model or c.model, dtype=torch.float32).to(c.device)
    policy.eval()  # no dropout: the log-probabilities must be those the server samples with
    reference.eval().requires_grad_(False)
    check_finite(policy.state_dict(), f"check the model folder {resume or c.model}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c))
    start_step = 0
    if resume:
        start_step = load_trainer_state(resume, optimizer, scheduler)["step"]
        log.info("resumed from %s at step %d", resume, start_step)
    if start_step >= c.steps:
        raise ValueError(
            f"checkpoint {resume} is at step {start_step}; nothing left to do for steps={c.steps}"
        )

    # metrics.jsonl: a fresh run starts it anew; a resumed run keeps the lines up to its checkpoint
    metrics_path = out / METRICS_FILE
    kept = []
    if resume and metrics_path.exists():
        kept = [
            ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step
        ]
    metrics_path.write_text("".join(ln + "\n" for ln in kept))

    # --- the server: reachable? same architecture? which version offset? ----------------------------------
    cleanup = ExitStack()  # closed on any exit: threads stopped, files and connections closed
    if backend is None:
        backend = make_backend(c)
        cleanup.callback(backend.close)
    try:
        if hasattr(backend, "wait_until_ready"):
            backend.wait_until_ready(c.connect_timeout)
        server_version, server_tensors = backend.weights_spec()
        push_names = check_compatible(server_tensors, policy, f"the server at {c.server_url}")
        offset = 0 if (start_step == 0 and server_version == 0) else max(0, server_version + 1 - start_step)

        served_dtypes = {n: server_tensors[n][1] for n in push_names}

        def snapshot():  # a copy the optimizer will not modify while it is pushed, in the served dtypes
            state = policy.state_dict()
            check_finite(state, "lower learning_rate and resume from the last checkpoint")
            return backend.snapshot(state, served_dtypes)

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
        producer = Producer(c, task, backend, pusher, start_step + 1, c.steps, sampling)
        cleanup.callback(producer.stop.set)

        # metrics lines are written in step order, each once its push is done (it carries push_seconds)
        pending: list[dict] = []
        metrics_file = cleanup.enter_context(metrics_path.open("a"))

        def flush_metrics() -> None:
            while pending and pending[0]["step"] <= pusher.served:
                metrics_file.write(json.dumps(pending.pop(0)) + "\n")
            metrics_file.flush()

        bar = cleanup.enter_context(
            tqdm(
                total=c.steps,
                initial=start_step,
                desc="online-dpo",
                disable=not c.progress_bar,
                dynamic_ncols=True,
            )
        )
        train_intervals: list[tuple[float, float]] = []  # when the trainer was busy, for the overlap measure
        K = c.samples_per_prompt
        last_checkpoint, checkpoint_seconds = None, 0.0
        loop_start = step_end = time.monotonic()
        for step in range(start_step + 1, c.steps + 1):
            # --- 1. the batch (generated ahead by the producer) ---------------------------------------------
            wait_start = time.monotonic()
            batch = producer.get(pusher)
            busy_start = time.monotonic()
            staleness = (step - 1) - batch.policy_version
            if not 0 <= staleness <= c.max_staleness:
                raise RuntimeError(f"step {step} got a batch of policy version {batch.policy_version}")
            samples = batch.samples

            # --- 2. score: rewards of the B*K samples, missing-EOS penalty, pairs ---------------------------
            flat = [cmp for row in samples.completions for cmp in row]  # (B*K,) prompt-major
            prompts_flat = [p for p in samples.prompts for _ in range(K)]
            raw_rewards = reward_fn(prompts_flat, [cmp.text for cmp in flat])
            finished = [cmp.finish_reason == "stop" for cmp in flat]
            rewards = apply_missing_eos_penalty(raw_rewards, finished, c.missing_eos_penalty)
            pairs, skipped_ties = build_pairs(rewards, K)  # [(prompt b, chosen k, rejected k)]
            score_end = time.monotonic()

            # --- 3. DPO loss on the pairs and one optimizer step --------------------------------------------
            P = len(pairs)
            stats = dict(loss=0.0, margin=0.0, accuracy=0.0, kl_sum=0.0, kl_tokens=0)
            optimizer.zero_grad(set_to_none=True)
            mb = c.micro_batch_size or max(P, 1)
            for i in range(0, P, mb):  # micro-batches of pairs; gradients accumulate
                chunk = pairs[i : i + mb]
                m = len(chunk)
                prompt_ids = [samples.prompt_token_ids[b] for b, _, _ in chunk] * 2
                completion_ids = [samples.completions[b][kc].token_ids for b, kc, _ in chunk] + [
                    samples.completions[b][kr].token_ids for b, _, kr in chunk
                ]  # chosen rows then rejected rows: (2m,)
                input_ids, attention_mask, completion_mask = (
                    t.to(c.device) for t in collate(prompt_ids, completion_ids, pad_id)
                )  # (2m, T)
                policy_tok = token_logps(policy, input_ids, attention_mask) * completion_mask  # (2m, T)
                with torch.no_grad():
                    ref_tok = token_logps(reference, input_ids, attention_mask) * completion_mask  # (2m, T)
                policy_logps, ref_logps = policy_tok.sum(-1), ref_tok.sum(-1)  # (2m,)
                chosen_logps, rejected_logps = policy_logps[:m], policy_logps[m:]  # (m,)
                ref_chosen_logps, ref_rejected_logps = ref_logps[:m], ref_logps[m:]  # (m,)
                losses = dpo_loss(
                    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, c.beta, c.loss
                )
                (losses.sum() / P).backward()  # the mean over all P pairs
                with torch.no_grad():
                    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (m,)
                    stats["loss"] += losses.sum().item() / P
                    stats["margin"] += h.sum().item() / P
                    stats["accuracy"] += (h > 0).sum().item() / P
                    stats["kl_sum"] += (policy_tok - ref_tok).sum().item()  # of log pi - log pi_ref
                    stats["kl_tokens"] += int(completion_mask.sum().item())
            grad_norm = None
            if P:  # (an infinite max_norm only measures)
                max_norm = c.max_grad_norm if c.max_grad_norm is not None else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm).item()
                if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm)):
                    raise NotFiniteError(
                        f"step {step}: loss {stats['loss']}, gradient norm {grad_norm}; the step was not "
                        f"applied and the server keeps version {step - 1 + offset} at most. Lower "
                        "learning_rate (or set max_grad_norm) and resume from the last checkpoint"
                    )
            optimizer.step()  # without pairs no parameter has a gradient: the weights stay as they are
            lr = scheduler.get_last_lr()[0]
            scheduler.step()

            # --- 4. push policy version `step` in the background --------------------------------------------
            weights = snapshot()
            train_end = time.monotonic()
            train_intervals = train_intervals[-c.max_staleness - 1 :] + [(busy_start, train_end)]
            record = {
                "step": step,
                "version": step,
                "batch_weights_version": batch.policy_version,
                "staleness": staleness,
                "reward_mean": mean(rewards),
                "reward_chosen": mean(rewards[b * K + kc] for b, kc, _ in pairs),
                "reward_rejected": mean(rewards[b * K + kr] for b, _, kr in pairs),
                "loss": stats["loss"] if P else None,
                "kl": stats["kl_sum"] / stats["kl_tokens"] if P else None,
                "reward_accuracy": stats["accuracy"] if P else None,
                "logratio_margin": stats["margin"] if P else None,
                "pairs": P,
                "skipped_ties": skipped_ties,
                "finished_fraction": mean(finished),
                "completion_tokens": mean(len(cmp.token_ids) for cmp in flat),
                "lr": lr,
                "grad_norm": grad_norm,
                # timings: *_seconds, the only fields that differ between identical runs
                "gen_seconds": round(batch.gen_end - batch.gen_start, 4),
                "score_seconds": round(score_end - busy_start, 4),
                "train_seconds": round(train_end - score_end, 4),
                "wait_seconds": round(busy_start - wait_start, 4),  # trainer idle, waiting for the batch
                "overlap_seconds": round(  # generation of this batch hidden behind earlier training
                    sum(overlap((batch.gen_start, batch.gen_end), iv) for iv in train_intervals[:-1]), 4
                ),
                "wall_seconds": round(train_end - step_end, 4),
            }
            pusher.submit(step, weights, record)
            pending.append(record)
            flush_metrics()
            if on_step is not None:
                on_step(record)
            bar.set_postfix(
                reward=f"{record['reward_mean']:.3f}",
                loss=f"{stats['loss']:.4f}" if P else "n/a",
                step_s=f"{record['wall_seconds']:.2f}",
                refresh=False,
            )
            bar.update(1)
            if c.log_every and step % c.log_every == 0:
                tqdm.write(json.dumps(record))

            # --- 5. checkpoint (after the push, so its metrics line is on disk first) -----------------------
            if step == c.steps or (c.checkpoint_every and step % c.checkpoint_every == 0):
                t0 = time.monotonic()
                pusher.wait_served(step)
                flush_metrics()
                extra = {"config": c.model_dump(), "version_offset": offset}
                last_checkpoint = save_checkpoint(
                    checkpoint_dir(out, step), policy, tokenizer, optimizer, scheduler, step, extra
                )
                checkpoint_seconds += time.monotonic() - t0
            step_end = time.monotonic()
        pusher.close()
        flush_metrics()
    finally:
        cleanup.close()
    return {
        "steps": c.steps,
        "start_step": start_step,
        "output_dir": str(out),
        "metrics_path": str(metrics_path),
        "final_checkpoint": str(last_checkpoint),
        "version_offset": offset,
        "server_version": c.steps + offset,
        "wall_seconds": round(time.monotonic() - loop_start, 3),
        "checkpoint_seconds": round(checkpoint_seconds, 3),
    }
