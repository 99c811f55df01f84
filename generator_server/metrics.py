"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "generator_generate_requests", "POST /generate requests by outcome", ["outcome"], registry=r
        )
        self.prompts = Counter("generator_prompts", "Prompts generated for", registry=r)
        self.prompt_tokens = Counter("generator_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter(
            "generator_generated_tokens", "Completion tokens generated", registry=r
        )
        self.generate_latency = Histogram(
            "generator_generate_latency_seconds",
            "Seconds from a /generate request's arrival to its answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.weight_loads = Counter(
            "generator_weight_loads",
            "Weight reloads by source and outcome",
            ["source", "outcome"],
            registry=r,
        )
        self.weight_load_seconds = Histogram(
            "generator_weight_load_seconds",
            "Seconds generation was paused to swap weights",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.weights_version = Gauge("generator_weights_version", "Weights version being served", registry=r)
        self.requests_running = Gauge(
            "generator_generate_requests_running",
            "/generate requests generating now (on the served weights)",
            registry=r,
        )
        self.requests_waiting = Gauge(
            "generator_generate_requests_waiting",
            "/generate requests held back by a weight reload (they run on the new weights once it is done)",
            registry=r,
        )
        self.weight_loads_waiting = Gauge(
            "generator_weight_loads_waiting",
            "Weight reloads waiting for running /generate requests to finish (new requests wait behind them)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
