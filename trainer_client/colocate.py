"""Colocated mode: the vLLM engine runs inside the trainer process, on the trainer's device.

Everything needed for vLLM to share one device with a training process lives here:

- **In-process engine.** ``vllm.LLM`` built with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs its engine core
  and its single worker (the uni-process executor) in this process, so the engine's ``nn.Module`` sits in
  the trainer's own memory. (``AsyncLLM`` always starts a separate engine-core process, so it cannot be
  used here.) We check that the worker really answers from our own process id and fail otherwise.
- **Memory.** On a GPU the engine may take ``gpu_memory_utilization`` of the device (weights, activations
  and KV cache); the trainer's policy, reference and optimizer must fit in the rest. On CPU the KV cache is
  a fixed ``kv_cache_gib`` (vLLM's ``VLLM_CPU_KVCACHE_SPACE``), because vLLM's automatic CPU sizing
  subtracts the whole process's RSS, i.e. the trainer's memory too.
- **Sleep while training.** Where the platform supports it (CUDA/ROCm/XPU), the engine is created with
  ``enable_sleep_mode`` and put to ``sleep(level=1)`` when it goes idle after a generation: the KV cache
  is freed and the weights are moved to host memory, so training gets the device memory back. The next
  weight handover or generation wakes it up. vLLM's CPU build has no sleep mode (its worker ignores
  ``sleep``), so on CPU the engine simply stays resident.
- **Weights in memory.** :meth:`ColocatedEngine.load_weights` passes the policy's tensors to the worker
  through ``collective_rpc`` with a function; in-process that is a plain call (no file, no HTTP, no
  serialisation). The function runs vLLM's in-place ``reload_weights(weights_iterator=...)``, which also
  redoes the kernel-specific processing of the weights (vLLM's CPU linears repack theirs for oneDNN), or,
  on a vLLM without it, the model's ``load_weights``. Either copies every tensor into vLLM's own (fused,
  possibly lower-precision) parameters. The prefix cache is reset afterwards: its KV came from the old
  weights.
- **Side effects on the trainer.** Building a vLLM worker re-seeds torch's global RNG, sets torch's
  float32 matmul precision, and (CPU) drops torch to one intra-op thread and replaces
  ``torch.set_num_threads`` by a no-op; all of it is undone. vLLM's sampler draws from torch's global RNG
  even for seeded requests, so that state is restored after every generation (which always runs with
  per-request seeds, drawn from a private RNG when the caller passes none). The trainer's random stream is
  thus the same as without the engine, and a resumed run samples what the uninterrupted one did. The loop
  calls the engine from its own threads, so each call first gives its thread torch's OpenMP thread count
  (see :func:`_init_omp_threads`).

``generate`` answers like the server's ``POST /generate``: raw log-probabilities (the model's
log-softmax at temperature 1, before top-p/top-k), ``finish_reason`` ``stop`` or ``length``, and the
version of the weights that produced the batch.

:class:`ColocatedBackend` wraps the engine as the training loop's generation backend
(``trainer_client.generation.GenerationBackend``). It relies on long-standing public vLLM APIs (``LLM``,
``SamplingParams``, ``LLM.collective_rpc`` with a callable, ``sleep``/``wake_up``, ``reset_prefix_cache``)
and fails with a clear message where one is missing; the in-place ``reload_weights`` is used where the
worker has it. Tested with vLLM 0.32 on CPU; the GPU path (sleep mode, vLLM 0.26) is not tested here.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from generator_server.gguf_model import resolve_model
from online_dpo_protocol.models import LORA_RANKS, Completion, GenerateRequest, GenerateResponse, PromptResult
from trainer_client.client import GenerateApi
from trainer_client.generation import GenerationBatch


class ColocateError(RuntimeError):
    """The colocated engine cannot be built or used as asked (wrong vLLM, wrong device, bad weights)."""


@dataclass
class EngineSettings:
    """How to build the in-process engine."""

    model: str
    """Hugging Face model folder the engine starts from (the policy's initial weights), or a GGUF file (its
    converted folder is used: generator_server/gguf_model.py)."""
    device: str = "cpu"
    """The trainer's device: ``cpu`` or ``cuda``/``cuda:0`` (vLLM's single worker uses device 0)."""
    dtype: str = "auto"
    """Engine weights dtype; ``auto`` = the folder's ``config.json`` dtype (not vLLM's ``auto``, which turns
    float32 into bfloat16 on CPU). The policy's tensors are cast on handover."""
    gpu_memory_utilization: float = 0.3
    """GPU: fraction of the device the engine may take (weights + activations + KV cache)."""
    kv_cache_gib: int = 1
    """CPU: KV cache size in GiB."""
    sleep: bool = True
    """Free the engine's device memory while it is idle (GPU only; vLLM's CPU build has no sleep mode)."""
    max_model_len: int | None = None
    """Context length of the engine; default: the model's."""
    enforce_eager: bool = True
    """Skip torch.compile and CUDA graphs (quick start; graphs are re-captured on a GPU otherwise)."""
    seed: int = 0
    """Seed of the engine and of generation seeds drawn when the caller passes none."""
    max_lora_rank: int | None = None
    """Take LoRA adapters up to this rank (vLLM's LoRA, as the server's --enable-lora); None: no LoRA."""


# ---------------------------------------------------------------------------------------------------------
# Keeping the trainer's process state intact
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def _trainer_state_preserved():
    """Undo what building a vLLM worker does to process-global state the trainer relies on."""
    import numpy as np
    import torch

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    matmul_precision = torch.get_float32_matmul_precision()  # vLLM's workers set their own
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker swaps in a no-op
        torch.set_num_threads(threads)  # vLLM drops to 1 thread "for serving"
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


@contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_omp_threads() -> None:
    """Give the calling thread torch's intra-op thread count before vLLM's CPU kernels run in it.

    OpenMP keeps the thread count per thread, and torch sets it in a new thread only at its first torch op.
    The training loop calls the engine from its producer and pusher threads, so vLLM's CPU attention would
    plan a step for the OpenMP default (all cores) and then run it with torch's count, and abort ("Check
    failed: input->metadata->thread_num == thread_num") whenever the two differ (e.g. 1 torch thread)."""
    import torch

    torch.get_num_threads()  # initialises this thread's OpenMP count to torch's


def _check_device(device: str) -> str:
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        if index not in ("", "0"):
            raise ColocateError(
                f"colocated mode runs vLLM's single worker on device 0, but the trainer's device is {device};"
                " select the GPU with CUDA_VISIBLE_DEVICES and use device: cuda"
            )
        return "cuda"
    raise ColocateError(f"colocated mode supports device cpu or cuda, not {device}")


def _worker_pid(worker) -> int:
    return os.getpid()


def _load_weights_into_worker(worker, weights: Sequence[tuple[str, Any]]) -> str:
    """Runs inside vLLM's worker (here: in our own process): copy ``weights`` into its model.

    vLLM's in-place reload (``reload_weights(weights_iterator=...)``) is used where it exists: it undoes
    the kernel-specific repacking done after loading (vLLM's CPU linears replace their weights by oneDNN
    handles) and redoes it on the new weights. Without it, the model's ``load_weights`` copies straight
    into the parameters, which is right for unquantized CUDA models."""
    runner = getattr(worker, "model_runner", None)
    reload = getattr(runner, "reload_weights", None)
    if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
        worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return "reload_weights"
    get_model = getattr(worker, "get_model", None)
    model = get_model() if get_model is not None else runner.model
    model.load_weights(weights=iter(weights))
    return "load_weights"


def read_weights_spec(model_dir: str | Path) -> dict[str, tuple[list[int], str]]:
    """``{tensor name: (shape, dtype)}`` of the safetensors files of a model folder (headers only)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ColocateError(f"no *.safetensors in {model_dir}")
    spec: dict[str, tuple[list[int], str]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)
                spec[name] = (list(sl.get_shape()), _DTYPE_NAMES.get(sl.get_dtype(), sl.get_dtype()))
    return spec


def folder_dtype(model_dir: str | Path) -> str:
    """The dtype a model folder's ``config.json`` declares (``dtype`` or ``torch_dtype``), else ``auto``."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    return str(dtype).removeprefix("torch.")


_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------
class ColocatedEngine(GenerateApi):
    """A vLLM engine in this process that generates like the server's ``/generate`` and takes new weights
    from a ``state_dict`` in memory. Thread-safe: calls are serialised by a lock."""

    def __init__(self, settings: EngineSettings):
        # a GGUF file becomes its converted folder (cached: the learner's conversion is reused)
        settings = self.settings = replace(settings, model=resolve_model(settings.model))
        self.device = _check_device(settings.device)
        self.weights_version = 0
        self.spec = read_weights_spec(settings.model)
        self._lock = threading.Lock()
        self._seeds = random.Random(settings.seed)  # private: never touches the trainer's RNG
        self._asleep = False
        self.adapter = None
        """The LoRA adapter (vLLM's ``LoRARequest``) served on the weights as ``weights_version``, or None."""
        self._lora_ids = itertools.count(1)
        self.base_version = 0
        """The version whose whole weights the engine holds (0: the model folder's)."""
        self.llm = self._build()

    def _build(self):
        # vLLM reads these while it builds the engine (and then caches its environment for the process);
        # they are set only meanwhile, so that processes started later do not inherit them.
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.settings.kv_cache_gib)
        with _environment(env), _trainer_state_preserved():
            import vllm
            import vllm.envs
            from vllm import LLM
            from vllm.platforms import current_platform

            if hasattr(vllm.envs, "disable_envs_cache"):  # an earlier engine may have frozen the old values
                vllm.envs.disable_envs_cache()

            for api in ("collective_rpc", "sleep", "wake_up", "reset_prefix_cache"):
                if not hasattr(LLM, api):
                    raise ColocateError(
                        f"vllm {vllm.__version__} has no LLM.{api}; colocated mode needs vLLM >= 0.26"
                    )
            self.sleep_supported = self.device == "cuda" and current_platform.is_sleep_mode_available()
            dtype = self.settings.dtype
            if self.device != "cuda":  # (float32 where the CPU has no native bfloat16, as the server does)
                from generator_server.engine import cpu_dtype

                dtype = cpu_dtype(dtype)
            kwargs: dict[str, Any] = dict(
                model=self.settings.model,
                dtype=folder_dtype(self.settings.model) if dtype == "auto" else dtype,
                seed=self.settings.seed,
                enforce_eager=self.settings.enforce_eager,
                max_model_len=self.settings.max_model_len,
                # log-probabilities of the raw logits (before temperature, top-p, top-k), as the server
                logprobs_mode="raw_logprobs",
            )
            if self.settings.max_lora_rank is not None:  # one adapter in a batch, two held (as the server)
                kwargs |= dict(
                    enable_lora=True, max_lora_rank=self.settings.max_lora_rank, max_loras=1, max_cpu_loras=2
                )
            if self.device == "cuda":
                kwargs["gpu_memory_utilization"] = self.settings.gpu_memory_utilization
                kwargs["enable_sleep_mode"] = self.settings.sleep and self.sleep_supported
            else:  # a seeded prefill split across engine steps kills vLLM's CPU engine (as in the server)
                from generator_server.engine import CPU_BLOCK_SIZE

                kwargs["enable_chunked_prefill"] = False
                kwargs["block_size"] = CPU_BLOCK_SIZE  # (prefix caching shares whole blocks: as the server)
            self.vllm_version = vllm.__version__
            llm = LLM(**kwargs)
        pids = llm.collective_rpc(_worker_pid)
        if pids != [os.getpid()]:
            raise ColocateError(
                f"vLLM's worker runs in process {pids}, not in the trainer ({os.getpid()}); colocated mode "
                "needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM starts)"
            )
        return llm

    @property
    def sleeping(self) -> bool:
        return self._asleep

    # --- generation ------------------------------------------------------------------------------------
    def _generate(self, body: dict[str, Any]) -> GenerateResponse:
        """The server's ``POST /generate``, answered in process (``generate``, from :class:`GenerateApi`:
        the client's arguments): the body checked by the same model (``GenerateRequest``: a ValueError
        naming the field where the server answers 422), and the same response."""
        request = GenerateRequest.model_validate(body)
        if request.prompts is not None:
            inputs: list = request.prompts
        else:
            inputs = [{"prompt_token_ids": ids} for ids in request.prompt_token_ids]
        import torch
        from vllm import SamplingParams

        with self._lock:
            _init_omp_threads()
            seed = self._seeds.randrange(2**31) if request.seed is None else request.seed
            params = SamplingParams(
                n=request.n, max_tokens=request.max_tokens, temperature=request.temperature,
                top_p=request.top_p,
                top_k=max(request.top_k, 0),  # 0 = off in vLLM >= 0.9 (-1 in the HTTP contract)
                min_tokens=request.min_tokens, stop=request.stop, seed=seed, ignore_eos=request.ignore_eos,
                logprobs=0 if request.logprobs else None,
            )  # fmt: skip
            self._wake()
            # vLLM's sampler draws from torch's global generator even for seeded requests; in this process
            # that is the trainer's, so it is put back as it was.
            cuda = [torch.cuda.current_device()] if self.device == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.adapter)
            version = self.weights_version
            self._sleep()
        results = []
        for out in outputs:
            completions = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length"):  # as the server, which answers 503
                    raise ColocateError(f"generation ended early ({c.finish_reason})")
                lps = None
                if request.logprobs:  # one {token id: Logprob} per step, holding (at least) the sampled token
                    lps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)]
                completions.append(
                    Completion(
                        text=c.text, token_ids=list(c.token_ids), logprobs=lps,
                        finish_reason=c.finish_reason,
                    )
                )  # fmt: skip
            results.append(PromptResult(prompt_token_ids=list(out.prompt_token_ids), completions=completions))
        return GenerateResponse(weights_version=version, results=results)

    # --- weights ---------------------------------------------------------------------------------------
    def check_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Raise :class:`ValueError` naming the first unknown, missing or mis-shaped tensor."""
        unknown = sorted(set(state_dict) - set(self.spec))
        missing = sorted(set(self.spec) - set(state_dict))
        if unknown:
            raise ValueError(f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
        if missing:
            raise ValueError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        for name, tensor in state_dict.items():
            expected = self.spec[name][0]
            if list(tensor.shape) != expected:
                raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {expected}")

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> float:
        """Copy ``state_dict`` (the policy's parameter names and shapes) into the engine; from then on its
        outputs report ``version``. Returns the seconds it took."""
        if version <= self.weights_version:
            raise ValueError(f"version {version} is not greater than the current {self.weights_version}")
        self.check_weights(state_dict)
        weights = [(name, t.detach()) for name, t in state_dict.items()]
        with self._lock:
            start = time.perf_counter()
            _init_omp_threads()
            self._wake()
            self.llm.collective_rpc(_load_weights_into_worker, args=(weights,))
            self.llm.reset_prefix_cache()  # cached KV came from the old weights
            self.weights_version = version
            replaced, self.adapter = self.adapter, None  # whole weights: served without an adapter
            self.base_version = version
            self._forget_adapter(replaced)
            seconds = time.perf_counter() - start
        return seconds

    def load_adapter(self, tensors: Mapping[str, Any], config: dict, version: int) -> float:
        """Serve the base weights plus the LoRA adapter ``tensors`` (peft's names; ``config``: its
        adapter_config.json) as ``version``. vLLM loads an adapter from a folder: it is written into one in
        memory (``/dev/shm`` where there is one), loaded beside the adapter served now, then swapped in.
        Returns the seconds it took."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.settings.max_lora_rank is None:
            raise ColocateError("this engine takes no LoRA adapters (built without max_lora_rank)")
        if version <= self.weights_version:
            raise ValueError(f"version {version} is not greater than the current {self.weights_version}")
        if config["r"] > self.settings.max_lora_rank:
            raise ValueError(f"adapter rank {config['r']} is over the engine's {self.settings.max_lora_rank}")
        start = time.perf_counter()
        memory = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        folder = Path(tempfile.mkdtemp(prefix="colocated-adapter-", dir=memory))
        try:
            host = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
            save_file(host, folder / "adapter_model.safetensors")
            (folder / "adapter_config.json").write_text(json.dumps(config))
            request = LoRARequest(f"weights-v{version}", next(self._lora_ids), str(folder))
            with self._lock:
                _init_omp_threads()
                self._wake()
                self.llm.llm_engine.add_lora(request)
                replaced, self.adapter, self.weights_version = self.adapter, request, version
                self._forget_adapter(replaced)
        except BaseException:
            if self.adapter is None or self.adapter.lora_path != str(folder):
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return time.perf_counter() - start

    def _forget_adapter(self, adapter) -> None:
        """Drop an adapter no version serves any more (called under the lock)."""
        if adapter is None:
            return
        try:
            self.llm.llm_engine.remove_lora(adapter.lora_int_id)
        finally:
            shutil.rmtree(adapter.lora_path, ignore_errors=True)

    # --- sleep -----------------------------------------------------------------------------------------
    def _sleep(self) -> None:
        if self.settings.sleep and self.sleep_supported and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and give its memory back (KV cache, weights)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        if self.device == "cuda":
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()


def settings_from_config(config, model: str | Path | None = None) -> EngineSettings:
    """:class:`EngineSettings` from a :class:`~trainer_client.config.TrainConfig` (its ``colocate_*`` keys);
    ``model`` replaces ``config.model``."""
    return EngineSettings(
        model=str(model or config.model),
        device=config.device,
        dtype=config.colocate_dtype,
        gpu_memory_utilization=config.colocate_gpu_memory_utilization,
        kv_cache_gib=config.colocate_kv_cache_gib,
        sleep=config.colocate_sleep,
        max_model_len=config.colocate_max_model_len,
        enforce_eager=config.colocate_enforce_eager,
        seed=config.seed,
        max_lora_rank=engine_lora_rank(config),
    )


def engine_lora_rank(config) -> int | None:
    """The max LoRA rank a vLLM engine needs for a trainer config (the in-process one here, or the server
    the demo starts): the smallest rank vLLM takes that holds ``lora_rank``, with ``lora_sync: adapter``;
    None (no LoRA in the engine) otherwise. (A rank over vLLM's largest is refused with the config.)"""
    if not (config.lora_rank and config.lora_sync == "adapter"):
        return None
    return min(r for r in LORA_RANKS if r >= config.lora_rank)


@contextmanager
def local_engine(model: str | Path, config) -> Iterator[ColocatedEngine]:
    """An in-process engine on ``model`` for the length of a ``with`` block; what ``local_server`` is to
    server mode. Its ``generate`` takes the arguments of ``GeneratorClient.generate``, so
    ``trainer_client.evaluate.evaluate(engine, task)`` works on it."""
    engine = ColocatedEngine(settings_from_config(config, model))
    try:
        yield engine
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------------------
# The training loop's backend
# ---------------------------------------------------------------------------------------------------------
@dataclass
class AdapterSnapshot:
    """A LoRA adapter's tensors (peft's names, served dtype) and adapter_config.json, for one push."""

    tensors: dict[str, Any]
    config: dict


class ColocatedBackend:
    """``mode: colocate``: the :class:`~trainer_client.generation.GenerationBackend` of an in-process engine.

    The loop is the same as in server mode: its producer thread calls :meth:`generate` while the training
    thread trains, and its pusher thread calls :meth:`push` after every step, here a copy in memory."""

    def __init__(self, engine: ColocatedEngine):
        self.engine = engine

    @classmethod
    def from_config(cls, config) -> ColocatedBackend:
        """Build the engine from a :class:`~trainer_client.config.TrainConfig` (its ``colocate_*`` keys)."""
        return cls(ColocatedEngine(settings_from_config(config)))

    def weights_spec(self) -> tuple[int, dict[str, tuple[list[int], str]]]:
        return self.engine.weights_version, dict(self.engine.spec)

    def version(self) -> int:
        return self.engine.weights_version

    def max_lora_rank(self) -> int | None:
        return self.engine.settings.max_lora_rank

    def base_version(self) -> int:
        return self.engine.base_version

    def generate(self, prompts, n, max_tokens, temperature, seed, top_p=1.0, stop=None, logprobs=False):
        out = self.engine.generate(
            prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
            seed=seed, logprobs=logprobs,
        )  # fmt: skip
        return GenerationBatch.answered(prompts, out)

    @property
    def max_pending(self) -> int:
        return 1 if self.engine.device == "cuda" else 2  # each snapshot is a copy of the model

    def snapshot(self, tensors: Mapping[str, Any], dtypes: Mapping[str, str], adapter: dict | None = None):
        """Copies on the policy's own device in the served dtypes: on a GPU the handover is then a
        device-to-device copy into vLLM's parameters, with no trip through host memory. ``adapter``: a LoRA
        adapter's tensors and config, an :class:`AdapterSnapshot`."""
        from trainer_client.transports.base import served_dtype

        copies = {}
        for n, d in dtypes.items():
            copies[n] = tensors[n].detach().to(served_dtype(tensors[n], d), copy=True)
        return copies if adapter is None else AdapterSnapshot(copies, adapter)

    def push(self, snapshot: Mapping[str, Any] | AdapterSnapshot, version: int) -> dict:
        tensors = snapshot.tensors if isinstance(snapshot, AdapterSnapshot) else snapshot
        if isinstance(snapshot, AdapterSnapshot):
            seconds = self.engine.load_adapter(snapshot.tensors, snapshot.config, version)
        else:
            seconds = self.engine.load_weights(snapshot, version)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return {"weights_version": version, "load_seconds": round(seconds, 4), "bytes": nbytes}

    def close(self) -> None:
        self.engine.close()
