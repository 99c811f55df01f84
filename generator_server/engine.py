"""The vLLM engine and what the HTTP contract needs around it: batched generation and safe weight swaps.

Consistency between generation and reloads comes from one readers-writer lock:

* each ``/generate`` call holds a read lock for its whole duration and reports the version read when it
  got the lock, so every completion of a response comes from that version's weights;
* a reload takes the write lock: it waits for running calls to finish, holds back new ones (they then
  run on the new weights), swaps the weights in place and lets them go.

Everything slow or fallible about a reload (receiving, copying and checking the file) happens before
the write lock is taken, so generation stops only for the swap itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from generator_server.config import ServerSettings
from generator_server.engine_plugin import CPU_POLL_PAUSE, POLL_ENV
from generator_server.errors import ApiError
from generator_server.lora import NOT_ENABLED, check_adapter, stage_adapter
from generator_server.metrics import ServerMetrics
from generator_server.rwlock import ReadersWriterLock
from generator_server.schemas import (
    Completion,
    GenerateRequest,
    GenerateResponse,
    GenerateTiming,
    PromptResult,
    TensorSpec,
    WeightsDigest,
    WeightsSpec,
    WeightsUpdate,
)
from generator_server.weights import (
    DIGESTS,
    FLOAT_DTYPES,
    TORCH_NAMES,
    TensorInfo,
    WeightStore,
    check_compatible,
    read_folder_tensors,
    safetensors_files,
)
from online_dpo_protocol import host_id

log = logging.getLogger(__name__)

TIED_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX). Without it vLLM's CPU build
    falls back to slow generic kernels for a bf16 model (measured: 28 tokens/s for SmolLM2-135M on an AVX2
    machine), and float32 is the fast choice."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def cpu_dtype(asked: str) -> str:
    """The dtype of an engine on the CPU: ``asked`` (--dtype) unless it is ``auto``; then float32 where
    the CPU has no native bfloat16, whatever the model folder's dtype (a bf16 folder converted from a GGUF
    file, say), else the folder's."""
    return asked if asked != "auto" or cpu_has_native_bf16() else "float32"


CPU_BLOCK_SIZE = 32
"""Tokens per KV-cache block of an engine on the CPU unless --block-size says otherwise. vLLM's CPU build
takes 128, and only whole blocks are shared between requests by prefix caching: a chat prompt of 60-120
tokens then shares nothing, so each of a prompt's n samples, and each prompt under the same system
message, is prefilled again. 32 is the smallest size its attention kernels are tuned for (16 fails to
start there). Measured on the 2-core CPU with SmolLM2-135M-Instruct (bench/generate_blocks.py): 4 chat
prompts x 8 samples of 1 token took 6.4 s at 128 and 2.0 s at 32, of 16 tokens 10.2 s and 6.5 s."""


def cpu_block_size(asked: int | None) -> int:
    """The KV-cache block size of an engine on the CPU: ``asked`` (--block-size), else ``CPU_BLOCK_SIZE``."""
    return CPU_BLOCK_SIZE if asked is None else asked


def cpu_kv_cache_gib(asked: float | None) -> float:
    """The KV cache of an engine on the CPU, in GiB: ``asked`` (--kv-cache-gib), else
    ``$VLLM_CPU_KVCACHE_SPACE`` (vLLM's own variable), else an eighth of the machine's memory, between 1
    and 4 GiB. vLLM's CPU build would otherwise take about 85% of the memory for it (19.9 of 23.6 GiB on
    a 24 GiB machine), leaving a trainer on the same machine too little."""
    if asked is not None:
        return asked
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    if env:
        return float(env)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return float(min(4, max(1, int(total / 8))))


DIRECT_LOAD = {"LlamaForCausalLM"}
"""Architectures whose CUDA IPC pushes ``--ipc-load auto`` loads straight into the parameters: checked on a
GPU to serve exactly what the same weights pushed over HTTP serve (tests/test_ipc_gpu.py)."""


class Swap:
    """What :meth:`GenerationEngine.swap` yields: timing, and work to do once the new version is served."""

    def __init__(self) -> None:
        self.started = self.seconds = 0.0
        self.waited = 0.0
        """Seconds from asking for the swap to holding the write lock: the running requests it waited for
        (and any swap before it)."""
        self.callbacks: list = []
        self.touched = True
        """Whether the engine's weights may have changed; a swap that fails untouched needs no recovery."""
        self.adapter = None
        """The LoRA adapter (vLLM's ``LoRARequest``) served with the new version: None for whole weights
        (``--enable-lora``: an adapter push sets it; a whole push serves its weights without one)."""

    def on_success(self, callback) -> None:
        self.callbacks.append(callback)


class GenerationEngine:
    """One ``vllm.v1.engine.async_llm.AsyncLLM`` serving one model folder, with versioned weights.

    Build it with :meth:`start` (it takes a while: the engine loads the model and warms up)."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.model_dir = Path(settings.model).resolve()
        self.expected = read_folder_tensors(self.model_dir)
        """Tensor name -> dtype and shape, as in the served model folder: what a push must contain."""
        self.store = WeightStore(self.model_dir, settings.work_dir, settings.max_upload_bytes)
        self.optional: dict[str, TensorInfo] = {}
        """Tensors a push may hold but need not (a tied output head, which the engine ignores)."""
        self.version = 0
        self.broken: str | None = None
        """Why the engine can no longer serve, if it cannot."""
        self.incomplete: str | None = None
        """Why the engine holds no whole version (a transfer failed half-way and the previous version could
        not be restored): /generate answers 503 until a full version arrives."""
        self.disk_version = 0
        """The version whose weights ``store.served_dir`` holds (a failed swap can go back to it)."""
        self.host_id = host_id()
        self.gpu_uuid: str | None = None
        """UUID of the GPU the engine's worker runs on (None on CPU)."""
        self.stream_port: int | None = None
        """The port of stream uploads, once it listens (``generator_server/stream.py``)."""
        self._weights_lock = ReadersWriterLock()
        metrics.requests_running.set_function(lambda: self._weights_lock.readers)
        metrics.weight_loads_waiting.set_function(lambda: self._weights_lock.writers_waiting)
        metrics.requests_waiting.set_function(lambda: self._weights_lock.readers_waiting)
        self._reload_mutex = asyncio.Lock()
        self._llm = None
        self.ipc_layerwise = True
        self.adapter = None
        """``--enable-lora``: the LoRA adapter (vLLM's ``LoRARequest``) served on the base weights as part of
        the served version, or None (the weights alone). Changes with the version, under the write lock."""
        self._lora_ids = itertools.count(1)
        self.base_version = 0
        """The version whose whole weights are served (0: ``--model``'s); adapter pushes leave it."""
        """Whether CUDA IPC transfers go through vLLM's layerwise reload (``--ipc-load``)."""

    @classmethod
    async def start(cls, settings: ServerSettings, metrics: ServerMetrics) -> GenerationEngine:
        engine = cls(settings, metrics)
        try:
            await asyncio.to_thread(engine._build)
            engine.gpu_uuid = (await engine._llm.collective_rpc("receiver_device_uuid"))[0]
        except BaseException:
            engine.shutdown()
            raise
        return engine

    def _build(self) -> None:
        """Start vLLM (blocking: run it in a thread so the HTTP server answers /health meanwhile)."""
        import vllm
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        on_cpu = current_platform.is_cpu()
        kv_cache_gib = cpu_kv_cache_gib(s.kv_cache_gib) if on_cpu else s.kv_cache_gib
        dtype = cpu_dtype(s.dtype) if on_cpu else s.dtype
        if on_cpu:
            if s.kv_cache_gib is not None:  # the flag wins over vLLM's variable, which would override it
                os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            log.info("KV cache: %.1f GiB of the machine's memory (--kv-cache-gib)", kv_cache_gib)
            if dtype != s.dtype:
                log.info("computing in %s: this CPU has no native bfloat16 (--dtype)", dtype)
            # The engine's processes poll for each other's steps with pauses, not spinning on a core the
            # worker or a trainer beside the server needs (generator_server/engine_plugin.py).
            os.environ.setdefault(POLL_ENV, str(CPU_POLL_PAUSE))
        args = AsyncEngineArgs(
            model=str(self.model_dir),
            dtype=dtype,
            max_model_len=s.max_model_len,
            gpu_memory_utilization=s.gpu_memory_utilization,
            tensor_parallel_size=s.tensor_parallel_size,
            data_parallel_size=s.data_parallel_size,
            seed=s.seed,
            enforce_eager=s.enforce_eager,
            max_num_seqs=s.max_num_seqs,
            # On the CPU a prompt is prefilled in one engine step, never split across steps: vLLM rewinds
            # the random generator of a seeded request whose prefill was split, which a CPU generator
            # cannot do ("CPU Generator does not use offset"), and the engine died. Without chunked
            # prefill vLLM raises its step's token budget to at least the context length.
            enable_chunked_prefill=False if on_cpu else None,
            block_size=cpu_block_size(s.block_size) if on_cpu else s.block_size,
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
            # Log-probabilities of the raw logits (before temperature, top-p and top-k): the numbers the
            # trainer computes for the same tokens.
            logprobs_mode="raw_logprobs",
            disable_log_stats=True,
            # receiver_* methods on the worker: CUDA IPC weight transfers (generator_server/ipc.py)
            worker_extension_cls="generator_server.worker_extension.WeightReceiver",
            # --enable-lora: one adapter in a batch (a version's), two held (the served one and the next)
            **(
                dict(enable_lora=True, max_lora_rank=s.max_lora_rank, max_loras=1, max_cpu_loras=2)
                if s.enable_lora
                else {}
            ),
        )
        llm = AsyncLLM.from_engine_args(args)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            model_config = llm.model_config
            self.vocab_size: int = model_config.get_vocab_size()
            self.max_model_len: int = model_config.max_model_len
            self.served_dtype = str(model_config.dtype).removeprefix("torch.")
            self.vllm_version: str = vllm.__version__
            self.device: str = current_platform.device_type
            if s.ipc_load == "direct" and model_config.quantization is not None:
                raise ValueError(
                    f"--ipc-load direct is for unquantized models; this one is {model_config.quantization}-"
                    "quantized: use --ipc-load layerwise"
                )
            architectures = set(model_config.architectures or [])
            direct_ok = model_config.quantization is None and architectures and architectures <= DIRECT_LOAD
            self.ipc_layerwise = s.ipc_load == "layerwise" or (s.ipc_load == "auto" and not direct_ok)
            tied = getattr(model_config.hf_text_config, "tie_word_embeddings", False)
            if tied and TIED_HEAD not in self.expected and EMBEDDING in self.expected:
                self.optional[TIED_HEAD] = self.expected[EMBEDDING]
        except BaseException:
            llm.shutdown()
            raise
        self._llm = llm  # last: from here on the engine counts as ready

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self.store.close()

    @property
    def llm(self):
        """The running ``AsyncLLM`` (vLLM's engine client), for vLLM's OpenAI serving layer."""
        return self._llm

    @property
    def ready(self) -> bool:
        return self._llm is not None and self.broken is None and not self._llm.errored

    # --- generation ------------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        m, started, outcome = self.metrics, time.perf_counter(), "error"
        try:
            self._check_request_size(request)
            if self.incomplete:
                raise ApiError(503, self.incomplete)
            prompts = await self._prompt_token_ids(request)
            params = await self._all_sampling_params(request, len(prompts))
            asked = time.perf_counter()
            async with self.weights_held() as version:
                held, adapter = time.perf_counter(), self.adapter  # (the version's: it cannot change here)
                jobs = [self._generate_one(ids, p, adapter) for ids, p in zip(prompts, params, strict=True)]
                outputs = await _all_or_nothing(jobs)
            done = time.perf_counter()
            timing = GenerateTiming(
                weights_wait_seconds=round(held - asked, 6), generate_seconds=round(done - held, 6)
            )
            results = await _prompt_results(outputs, request.logprobs)
            response = GenerateResponse(weights_version=version, results=results, timing=timing)
            outcome = "ok"
        except ApiError as e:
            outcome = "rejected" if e.status_code < 500 else "error"
            raise
        finally:
            m.requests.labels(outcome=outcome).inc()
            m.generate_latency.observe(time.perf_counter() - started)
        m.prompts.inc(len(prompts))
        m.prompt_tokens.inc(sum(len(ids) for ids in prompts))
        m.generated_tokens.inc(sum(len(c.token_ids) for r in response.results for c in r.completions))
        return response

    @asynccontextmanager
    async def weights_held(self) -> AsyncIterator[int]:
        """Hold the served weights (the read lock, as ``/generate`` does) inside the block and yield their
        version: a reload waits for the block to end, so what runs inside sees one version only."""
        if self.incomplete:
            raise ApiError(503, self.incomplete)
        async with self._weights_lock.read():
            if self.incomplete:  # a transfer failed while this request waited for the lock
                raise ApiError(503, self.incomplete)
            yield self.version

    def _check_request_size(self, request: GenerateRequest) -> None:
        """413 for more prompts or completions than this server takes in one request, before tokenizing."""
        count = len(request.prompts if request.prompts is not None else request.prompt_token_ids)
        if count > self.settings.max_prompts:
            raise ApiError(
                413,
                f"{count} prompts in one request; this server takes at most {self.settings.max_prompts} "
                "(--max-prompts): split the batch",
            )
        if request.n * count > self.settings.max_completions:
            raise ApiError(
                413,
                f"n={request.n} x {count} prompts = {request.n * count} completions in one request; this "
                f"server takes at most {self.settings.max_completions} (--max-completions): split the batch",
            )

    async def _prompt_token_ids(self, request: GenerateRequest) -> list[list[int]]:
        """Token ids of every prompt, checked here so that nothing invalid reaches the engine (400)."""
        if request.prompts is not None:
            prompts = await asyncio.to_thread(lambda: self.tokenizer(request.prompts)["input_ids"])
        else:
            prompts = request.prompt_token_ids
        for i, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, f"prompt {i} is empty")
            if len(ids) >= self.max_model_len:
                raise ApiError(
                    400, f"prompt {i} is {len(ids)} tokens long; the model's context is {self.max_model_len} "
                    "tokens, prompt and at least one generated token included",
                )  # fmt: skip
            outside = [t for t in ids if not 0 <= t < self.vocab_size]
            if outside:
                raise ApiError(
                    400,
                    f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size}): {outside[:5]}",
                )
        return prompts

    async def _all_sampling_params(self, request: GenerateRequest, count: int) -> list:
        """``_sampling_params`` of every prompt, ``SLICE`` between two turns of the event loop."""
        params = []
        for i in range(count):
            params.append(self._sampling_params(request, i))
            if i % SLICE == SLICE - 1:
                await asyncio.sleep(0)
        return params

    def _sampling_params(self, request: GenerateRequest, index: int):
        """Sampling parameters of prompt ``index``: with a seed, prompt i samples with ``seed + i``, so
        equal prompts in one batch still get independent completions."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = {"top_k": request.top_k} if request.top_k > 0 else {}  # vLLM's own default is "off"
        seed = None if request.seed is None else (request.seed + index) % 2**63
        try:
            return SamplingParams(
                n=request.n,
                # Capped at the context length: the engine stops there anyway ("length").
                max_tokens=min(request.max_tokens, self.max_model_len),
                min_tokens=min(request.min_tokens, self.max_model_len),
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stop,
                seed=seed,
                logprobs=0 if request.logprobs else None,  # 0: only the sampled token's
                ignore_eos=request.ignore_eos,
                output_kind=RequestOutputKind.FINAL_ONLY,
                **extra,
            )
        except ValueError as e:
            raise ApiError(400, f"invalid sampling parameters: {e}") from e

    async def _generate_one(self, prompt_token_ids: list[int], params, adapter=None):
        final = None
        stream = self._llm.generate(
            {"prompt_token_ids": prompt_token_ids}, params, uuid.uuid4().hex, lora_request=adapter
        )
        async for output in stream:
            final = output
        return final

    # --- weights ---------------------------------------------------------------------------------------
    def weights_spec(self) -> WeightsSpec:
        def dtype(info: TensorInfo) -> str:
            return self.served_dtype if info.dtype in FLOAT_DTYPES else TORCH_NAMES[info.dtype]

        return WeightsSpec(
            weights_version=self.version,
            tensors={n: TensorSpec(shape=list(i.shape), dtype=dtype(i)) for n, i in self.expected.items()},
            transports=self.transports,
            digests=list(DIGESTS),
            host_id=self.host_id,
            gpu_uuid=self.gpu_uuid,
            stream_port=self.stream_port,
            max_lora_rank=self.settings.max_lora_rank if self.settings.enable_lora else None,
            base_version=self.base_version,
        )

    async def weights_digest(self) -> WeightsDigest:
        """SHA-256 of every weight the engine holds now, read from the engine itself (see
        ``WeightReceiver.digest_weights``), with the version it serves; a reload waits until it is done."""
        async with self.weights_held() as version:
            per_worker = await self._llm.collective_rpc("digest_weights")
        return WeightsDigest(weights_version=version, dtype=self.served_dtype, tensors=per_worker[0])

    @property
    def transports(self) -> list[str]:
        """How this server takes new weights: always ``http``; ``shared`` (POST /weights/load) with a
        checkpoint root; ``ipc`` when one worker holds the whole model on a CUDA GPU; ``stream`` with a
        stream port."""
        offered = ["http"]
        if self.settings.checkpoint_root is not None:
            offered.append("shared")
        one_worker = self.settings.tensor_parallel_size == 1 and self.settings.data_parallel_size == 1
        if self.gpu_uuid is not None and one_worker:
            offered.append("ipc")
        if self.stream_port is not None:
            offered.append("stream")
        return offered

    def check_adapter_push(self, adapter: bool) -> None:
        """400 for an adapter push to a server without ``--enable-lora`` (before any byte is received)."""
        if adapter and not self.settings.enable_lora:
            raise ApiError(400, NOT_ENABLED)

    def check_version(self, version: int) -> None:
        if version <= self.version:
            raise ApiError(409, f"version {version} is not greater than the served version {self.version}")

    async def update_weights(self, staged: Path, nbytes: int, version: int, source: str) -> WeightsUpdate:
        """Check the staged folder, then swap it in as ``version``; ``staged`` is consumed either way."""
        try:
            found = await asyncio.to_thread(read_folder_tensors, staged)
            check_compatible(found, self.expected, self.optional)
            async with self.swap(version, source) as swap:
                staged = self.store.prepare(staged, version)
                await self._reload_from(staged)
                swap.on_success(lambda: self._promote(staged, version))
        except BaseException:
            self.store.discard(staged)
            raise
        log.info("serving weights version %d (%d bytes, swapped in %.3f s)", version, nbytes, swap.seconds)
        return WeightsUpdate(
            weights_version=version, bytes=nbytes, load_seconds=swap.seconds, wait_seconds=swap.waited
        )

    async def update_adapter(self, staged: Path, nbytes: int, version: int, source: str) -> WeightsUpdate:
        """Check the staged LoRA adapter upload (``model.safetensors`` with its config in the metadata:
        generator_server/lora.py), load it into the engine beside the adapter served now (generation goes on
        meanwhile), then serve it on the base weights as ``version``; ``staged`` becomes the adapter's folder
        while it is served, and is removed on failure, which leaves the previous version serving."""
        from vllm.lora.request import LoRARequest

        if not self.settings.enable_lora:
            self.store.discard(staged)
            raise ApiError(400, NOT_ENABLED)
        request = None
        try:
            self.check_version(version)
            expected, rank = self.expected, self.settings.max_lora_rank
            config = await asyncio.to_thread(check_adapter, staged / "model.safetensors", expected, rank)
            folder = await asyncio.to_thread(stage_adapter, staged, config)
            request = LoRARequest(f"weights-v{version}", next(self._lora_ids), str(folder))
            started = time.perf_counter()
            try:
                await self._llm.add_lora(request)  # (into the engine's cache; the served adapter stays)
            except Exception as e:
                raise ApiError(
                    400, f"the engine could not load the adapter ({type(e).__name__}: {e}); still serving "
                    f"version {self.version}",
                ) from e  # fmt: skip
            loaded = time.perf_counter() - started
            async with self.swap(version, source) as swap:
                swap.touched = False  # the engine's weights stay as they are: nothing to restore
                swap.adapter = request
                if self.disk_version == self.version:  # (the base on disk is still the served base)
                    swap.on_success(lambda: setattr(self, "disk_version", version))
        except BaseException:
            if request is not None and self.adapter is not request:
                await self._forget_adapter(request)
            else:
                self.store.discard(staged)
            raise
        log.info(
            "serving weights version %d: an adapter of rank %d (%d bytes; loaded %.3f s, swapped %.3f s)",
            version, config["r"], nbytes, loaded, swap.seconds,
        )  # fmt: skip
        return WeightsUpdate(
            weights_version=version, bytes=nbytes, load_seconds=swap.seconds, wait_seconds=swap.waited
        )

    async def _forget_adapter(self, adapter) -> None:
        """Drop an adapter no version serves from the engine, and its folder."""
        try:
            await self._llm.remove_lora(adapter.lora_int_id)
        except Exception:  # (the engine may not have it; a leftover costs memory, not correctness)
            log.warning("could not remove LoRA adapter %s from the engine", adapter.lora_name, exc_info=True)
        self.store.discard(Path(adapter.lora_path))

    def _promote(self, folder: Path, version: int) -> None:
        self.store.promote(folder)
        self.disk_version = version

    @asynccontextmanager
    async def swap(self, version: int, source: str) -> AsyncIterator[Swap]:
        """Change the served weights to ``version`` inside the block, with generation stopped.

        One swap at a time (the version is final once the mutex is held); the write lock waits for running
        requests and holds back new ones. If the block raises, the weights served before are put back from
        ``store.served_dir`` when it holds them; otherwise the engine is marked incomplete (503) until a
        whole version arrives. Never a mix of two versions served."""
        outcome, swap, replaced = "error", Swap(), None
        asked = time.perf_counter()
        try:
            async with self._reload_mutex:
                self.check_version(version)
                async with self._weights_lock.write():
                    swap.started = time.perf_counter()
                    swap.waited = swap.started - asked
                    try:
                        yield swap
                        await self._llm.reset_prefix_cache()  # cached KV came from the old weights
                    except BaseException as error:
                        if swap.touched:
                            await self._recover(error)
                        raise
                    swap.seconds = time.perf_counter() - swap.started
                    self.version, self.incomplete = version, None
                    replaced, self.adapter = self.adapter, swap.adapter
                    if swap.adapter is None:  # whole weights
                        self.base_version = version
                    for callback in swap.callbacks:
                        callback()
            outcome = "ok"
        finally:
            self.metrics.weight_loads.labels(source=source, outcome=outcome).inc()
        if outcome == "ok" and replaced is not None and replaced is not self.adapter:
            await self._forget_adapter(replaced)  # (no request uses it: the write lock waited for them)
        self.metrics.weight_load_seconds.observe(swap.seconds)
        self.metrics.weights_version.set(version)

    async def _recover(self, error: BaseException) -> None:
        """After a failed swap: reload the served version from disk if we have it there, else say why not."""
        if self.disk_version == self.version and not self.incomplete:
            log.exception("swapping in new weights failed; restoring version %d", self.version)
            try:
                await self._reload_from(self.store.served_dir)
                await self._llm.reset_prefix_cache()
            except Exception as restore_error:
                self.broken = (
                    f"weights reload failed and so did restoring the previous weights: {restore_error}"
                )
                log.exception(self.broken)
                raise ApiError(500, self.broken) from error
            if not isinstance(error, ApiError):
                raise ApiError(
                    500, f"the engine could not load the weights ({type(error).__name__}: {error}); "
                    f"still serving version {self.version}",
                ) from error  # fmt: skip
            return
        self.incomplete = (
            f"a weights transfer failed half-way ({type(error).__name__}: {error}) and version "
            f"{self.version} is not on the server's disk to go back to; push a full version"
        )
        log.error(self.incomplete)
        if not isinstance(error, ApiError):
            raise ApiError(500, self.incomplete) from error

    async def _reload_from(self, folder: Path) -> None:
        llm = self._llm
        await llm.pause_generation()  # nothing runs (we hold the write lock); this only quiets the engine
        try:
            # On a GPU the worker reads the files from its own mappings, page-locked once a file comes back
            # (mapped_weights.py): 0.12-0.18 s instead of 0.58 s for 2.27 GB on the H200 host. On the CPU
            # vLLM's own reading was the faster one (0.31-0.36 s against 0.34-0.55 s for 0.5 GB).
            on_gpu = self.gpu_uuid is not None
            files = [str(f) for f in safetensors_files(folder)] if on_gpu else []
            if files:  # (what the server stages always is; a model folder of .bin files is not)
                done = (await llm.collective_rpc("receiver_load_files", kwargs={"paths": files}))[0]
                log.debug(
                    "weights reloaded from %s in %.3f s (%d bytes, %d of them page-locked)",
                    folder.name, done["seconds"], done["bytes"], done["locked_bytes"],
                )  # fmt: skip
            else:
                await llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
            await llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        finally:
            await llm.resume_generation()


SLICE = 32
"""Requests handed to the engine, or answers built, between two turns of the event loop. Either costs the
loop about 0.05-0.5 ms a prompt, and a whole batch of 2048 in one turn kept every other route (/health,
/metrics) waiting for seconds on a loaded 2-core machine (bench/health_latency.py). Slices on the loop
rather than a worker thread: a thread would hand the GIL back and forth with the loop, which is slower
still when the process is short of CPU."""


async def _all_or_nothing(coroutines: list) -> list:
    """Run all at once (the engine batches them); if one fails, cancel the rest and raise. They are started
    ``SLICE`` at a time, with a turn of the event loop between slices."""
    tasks: list[asyncio.Future] = []
    try:
        for i, coroutine in enumerate(coroutines):
            tasks.append(asyncio.ensure_future(coroutine))
            if i % SLICE == SLICE - 1:
                await asyncio.sleep(0)
        return await asyncio.gather(*tasks)
    except BaseException:
        for coroutine in coroutines[len(tasks) :]:
            coroutine.close()  # never started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _prompt_results(outputs: list, with_logprobs: bool) -> list[PromptResult]:
    """The answer's results, ``SLICE`` prompts between two turns of the event loop."""
    results = []
    for i, output in enumerate(outputs):
        results.append(_prompt_result(output, with_logprobs))
        if i % SLICE == SLICE - 1:
            await asyncio.sleep(0)
    return results


def _prompt_result(output, with_logprobs: bool) -> PromptResult:
    completions = []
    for c in sorted(output.outputs, key=lambda c: c.index):
        token_ids = list(c.token_ids)
        if c.finish_reason not in ("stop", "length"):
            raise ApiError(503, f"generation ended early ({c.finish_reason}); retry")
        logprobs = None
        if with_logprobs:
            logprobs = [step[token].logprob for token, step in zip(token_ids, c.logprobs, strict=True)]
        completions.append(
            Completion(text=c.text, token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason)
        )
    return PromptResult(prompt_token_ids=list(output.prompt_token_ids), completions=completions)
