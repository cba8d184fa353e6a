"""Prometheus metrics, one registry per app (no module-level state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from inhouse.engine import EngineClient


class _EngineCollector:
    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def collect(self):
        s = self.client.stats()
        for name, doc, value in [
            ("inhouse_queue_depth", "requests waiting for admission", s.num_waiting),
            ("inhouse_running_requests", "requests in the running batch", s.num_running),
            ("inhouse_kv_blocks_used", "KV cache blocks in use", s.kv_blocks_used),
            ("inhouse_kv_blocks_total", "KV cache blocks in the budget", s.kv_blocks_total),
        ]:
            yield GaugeMetricFamily(name, doc, value=value)
        used = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield GaugeMetricFamily("inhouse_kv_usage_ratio", "fraction of the KV budget in use",
                                value=used)
        yield GaugeMetricFamily("inhouse_engine_replicas", "engines serving (Ray Serve replicas "
                                "heard from in the last 15 s; 1 in one process)",
                                value=s.num_replicas)
        yield GaugeMetricFamily("inhouse_engine_replicas_busy",
                                "engines with requests running or waiting", value=s.num_replicas_busy)
        yield GaugeMetricFamily("inhouse_prefix_cache_bytes",
                                "keys and values the prefix cache holds", value=s.prefix_cache_bytes)
        for name, doc, value in [
            ("inhouse_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache",
             s.prefix_queried_tokens),
            ("inhouse_prefix_cache_hit_tokens", "prompt tokens the prefix cache gave",
             s.prefix_hit_tokens)]:
            yield CounterMetricFamily(name, doc, value=value)
        rate = s.prefix_hit_tokens / s.prefix_queried_tokens if s.prefix_queried_tokens else 0.0
        yield GaugeMetricFamily("inhouse_prefix_cache_hit_ratio",
                                "prompt tokens reused over prompt tokens looked up", value=rate)


class Metrics:
    def __init__(self, client: EngineClient) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("inhouse_requests", "HTTP requests, by route and status (5xx too)",
                                ["endpoint", "status"], registry=r)
        self.duration = Histogram("inhouse_request_duration_seconds",
                                  "time from request to the end of the response, by route",
                                  ["endpoint"], buckets=(.005, .01, .05, .1, .25, .5, 1, 2.5, 5,
                                                         10, 30, 60, 120, 300), registry=r)
        self.queue_wait = Histogram("inhouse_queue_wait_seconds",
                                    "time a generation waited in the engine's queue",
                                    buckets=(.001, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60,
                                             120, 300), registry=r)
        self.prompt_tokens = Counter("inhouse_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("inhouse_completion_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram("inhouse_time_to_first_token_seconds", "time to first token",
                              buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.tokens_per_s = Histogram("inhouse_request_tokens_per_second",
                                      "generation speed per request",
                                      buckets=(.1, .5, 1, 2, 5, 10, 20, 50, 100, 200), registry=r)
        r.register(_EngineCollector(client))

    def observe_turn(self, finished) -> None:
        self.queue_wait.observe(finished.queue_wait_s)
        self.prompt_tokens.inc(finished.prompt_tokens)
        self.completion_tokens.inc(finished.completion_tokens)
        if finished.completion_tokens:
            self.ttft.observe(finished.time_to_first_token_s)
            if finished.total_s > 0:
                self.tokens_per_s.observe(finished.completion_tokens / finished.total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
