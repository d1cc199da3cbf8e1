"""The server's Prometheus metrics (``GET /metrics``), in one registry per app.

The quantities vLLM exposes, under leapc's names: requests by endpoint and status, prompt
and generated tokens, prompt tokens the prefix cache supplied (its hit rate is
``prefix_cache_hits_total / prompt_tokens_total``), queue time and time to first token, and per policy the decode
steps, drafted and accepted tokens. A policy's mean acceptance length (tokens per target
step, bonus token included) is ``generation_tokens_total / decode_steps_total``; its draft
acceptance rate is ``accepted_draft_tokens_total / draft_tokens_total``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from leapc.runtime.decode import GenerationStats

# seconds: from a few ms (a short prompt on an idle server) to a long queue
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("leapc_requests", "HTTP requests answered",
                                ("endpoint", "status"), registry=r)
        self.prompt_tokens = Counter("leapc_prompt_tokens", "prompt tokens prefilled",
                                     registry=r)
        self.prefix_cache_hits = Counter("leapc_prefix_cache_hits",
                                         "prompt tokens whose KV the prefix cache supplied",
                                         registry=r)
        self.generation_tokens = Counter("leapc_generation_tokens", "tokens generated",
                                         ("policy",), registry=r)
        self.decode_steps = Counter("leapc_decode_steps", "target steps that emitted tokens",
                                    ("policy",), registry=r)
        self.draft_tokens = Counter("leapc_draft_tokens",
                                    "drafted tokens verified (the deepest draft per step)",
                                    ("policy",), registry=r)
        self.accepted_tokens = Counter("leapc_accepted_draft_tokens",
                                       "drafted tokens verification accepted", ("policy",),
                                       registry=r)
        self.queue_time = Histogram("leapc_queue_seconds",
                                    "admission to the start of the request's generation",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("leapc_time_to_first_token_seconds",
                                     "admission to the first generated token",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("leapc_requests_running", "requests generating now", registry=r)
        self.batch_rows = Gauge("leapc_batch_rows",
                                "requests holding KV rows (in the batch or prefilling)",
                                registry=r)
        self.waiting = Gauge("leapc_requests_waiting", "requests admitted, not yet generating",
                             registry=r)

    def generation(self, stats: GenerationStats) -> None:
        """A finished (or cancelled) generation's counts."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.prefix_cache_hits.inc(stats.cached_prompt_tokens)
        self.generation_tokens.labels(stats.policy).inc(stats.new_tokens)
        self.decode_steps.labels(stats.policy).inc(stats.steps)
        self.draft_tokens.labels(stats.policy).inc(sum(stats.drafted_depth))
        self.accepted_tokens.labels(stats.policy).inc(sum(stats.accepted_depth))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
