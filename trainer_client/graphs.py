"""CUDA graphs of the DPO step's micro-batches and of the reference's forward (``cuda_graphs: true``, one
process on a GPU).

At the shapes of an online DPO step (tens of sequences of tens of tokens) the step is bound by launching
kernels, not by the card: a 24-layer model's forward and backward launch about 3,500 of them, each costing
the CPU more than the GPU. A CUDA graph records them once and launches them all at once.

A graph holds one shape, so the learner pads each micro-batch to a bucket (``bucket``): pairs and tokens
rounded up by at most half. Padding pairs have weight 0 and no completion tokens, padding tokens sit after
each sequence's end, so neither changes a gradient or a statistic (tests/test_learner.py checks the padded
step against the unpadded one on the CPU). A new bucket costs one recording: two eager warm-up passes and
the capture, all on inputs of weight 0, which add exactly zero to the gradients (so a recording may happen
between two micro-batches of a step).

Gradients must stay at the addresses the graphs write to: the learner zeroes them in place
(``zero_grad(set_to_none=False)``) and never frees them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger("trainer_client")


def bucket(n: int, smallest: int = 1) -> int:
    """``n`` rounded up to a multiple of half its power of two (16 -> 16, 17 -> 24, 25 -> 32), so a run's
    shapes fall into a few buckets per doubling; at least ``smallest``."""
    step = 1 << max(0, (n - 1).bit_length() - 2)
    return max(smallest, -(-n // step) * step)


class CudaGraphs:
    """``run(*tensors) -> tensor`` replayed from a CUDA graph per input shape, recorded on first use; at
    most ``max_graphs`` shapes, eager beyond them. ``run`` is the learner's micro-batch (token ids, masks,
    the reference's log-probabilities, pair weights -> statistics; gradients accumulate) or the reference's
    forward (token ids, masks -> summed log-probabilities). It is recorded on zeros but for its first two
    inputs (token ids and attention mask: a forward on real tokens), so a micro-batch adds nothing to the
    gradients while recording (its pair weights are 0). One instance per thread that replays."""

    def __init__(self, run: Callable[..., torch.Tensor], device: str, max_graphs: int = 32):
        self.run, self.device, self.max_graphs = run, torch.device(device), max_graphs
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: this instance's graphs run one by one
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The statistics of ``run(*inputs)``; the gradients accumulate as eager ``run`` would. The result
        lives in the graphs' pool: read it before the next call."""
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.run(*inputs)
            entry = self.graphs[key] = self._record(inputs)
        graph, static, stats = entry
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return stats

    def _record(self, inputs: tuple[torch.Tensor, ...]):
        t0 = time.monotonic()
        static = [torch.zeros_like(t) for t in inputs]
        static[0].copy_(inputs[0])  # real token ids and attention mask; the rest 0 (pair weights: the
        static[1].copy_(inputs[1])  # warm-up and the capture add exact zeros to the gradients)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: cuBLAS workspaces, autograd's first-use allocations
            for _ in range(2):
                self.run(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        name = getattr(self.run, "__name__", "run")
        try:
            # thread_local: the producer and pusher threads keep using the GPU while this thread records
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                stats = self.run(*static)
        except RuntimeError as e:
            raise RuntimeError(
                f"cuda_graphs: recording {name} for shape {tuple(inputs[0].shape)} failed ({e}); a model "
                "whose forward reads values back to the host cannot be recorded: set cuda_graphs: false"
            ) from e
        log.info(
            "cuda_graphs: recorded %s for shape %s in %.2f s (%d graphs)",
            name, tuple(inputs[0].shape), time.monotonic() - t0, len(self.graphs) + 1,
        )  # fmt: skip
        return graph, static, stats
