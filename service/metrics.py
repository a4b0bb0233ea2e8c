"""Prometheus metrics, all prefixed `warm_`, in a registry owned by one app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
REWARD_BUCKETS = (-20, -10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10, 20)


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.model_info = Gauge(
            "warm_model_info",
            "The served model (value 1).",
            ["model", "fingerprint", "dtype", "device", "backend"],
            registry=r,
        )
        self.requests = Counter(
            "warm_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "warm_request_duration_seconds", "Request latency, arrival to response.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokenize_latency = Histogram(
            "warm_tokenize_duration_seconds", "Rendering and tokenisation time per request.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "warm_queue_wait_seconds", "Time an item waits from admission to its forward pass.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_latency = Histogram(
            "warm_inference_duration_seconds",
            "Forward-pass time per batch (vLLM's engine: per request, submission to result).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.forwards = Counter(
            "warm_forwards", "Forward passes by the CPU threads each ran on "
            "('all': the backend's own; on a CPU, 1 of 2 means two forwards ran side by side).",
            ["threads"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "warm_batch_size", "Items per forward pass.", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "warm_batch_tokens", "Padded tokens per forward pass.", buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.padding_ratio = Histogram(
            "warm_batch_padding_ratio", "Share of a batch's padded tokens that are padding.",
            buckets=RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_requests = Gauge(
            "warm_queue_requests", "Requests admitted and not yet answered.", registry=r
        )
        self.queue_depth = Gauge(
            "warm_queue_depth", "Items waiting for a forward pass.", registry=r
        )
        self.queue_tokens = Gauge(
            "warm_queue_tokens", "Tokens admitted and not yet scored.", registry=r
        )
        self.items = Counter("warm_items_scored", "Items scored.", registry=r)
        self.tokens = Counter("warm_tokens_scored", "Tokens scored.", registry=r)
        self.dropped = Counter(
            "warm_items_dropped", "Items dropped before compute, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter("warm_errors", "Error responses by type.", ["type"], registry=r)
        self.rewards = Histogram(
            "warm_reward", "Distribution of served rewards (watch for reward hacking).",
            buckets=REWARD_BUCKETS, registry=r,
        )  # fmt: skip
        self.ready = Gauge("warm_ready", "1 when the model is loaded and warm.", registry=r)
