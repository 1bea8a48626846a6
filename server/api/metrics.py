"""Every Prometheus metric of the server, in one place, on a per-app registry.

Request-level series (counts, tokens, latencies) are updated by the routes as requests
finish. Engine and adapter-store state (running/waiting, KV usage, slots, adapter cache
counters) is read at scrape time from a snapshot taken on the engine thread, so the
engine keeps no Prometheus objects. vLLM-named gauges are exported too, for routers that
read them (e.g. the Gateway API inference extension reads `vllm:lora_requests_info`).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.client import EngineSnapshot

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# Store counters exported as loraplex_adapter_<name>_total (read from the snapshot).
ADAPTER_COUNTERS = ("loads", "evictions", "host_evictions", "host_hits", "host_misses", "device_hits",
                    "device_misses")


# The engine's gauges: (name, help, read from the snapshot); also exported per replica on Ray
# (server/deploy/replica_metrics.py).
ENGINE_GAUGES: tuple[tuple[str, str, Callable[[EngineSnapshot], float]], ...] = (
    ("loraplex_requests_running", "Requests holding KV blocks in the engine", lambda s: s.running),
    ("loraplex_requests_waiting", "Requests queued in the engine", lambda s: s.waiting),
    ("loraplex_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", lambda s: s.kv_usage),
    ("loraplex_kv_cache_blocks_total", "KV cache blocks in the pool", lambda s: s.kv_blocks_total),
    ("loraplex_kv_cache_blocks_used", "KV cache blocks in use", lambda s: s.kv_blocks_used),
    ("loraplex_lora_device_slots_used", "Adapter device slots holding an adapter", lambda s: s.device_slots_used),
    ("loraplex_lora_device_slots_total", "Adapter device slots (max_loras)", lambda s: s.max_loras),
    ("loraplex_kv_cache_blocks_cached", "KV cache blocks in the prefix cache (held or not)",
     lambda s: s.kv_blocks_cached),
)


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = EngineSnapshot()
        self.base_label = "base"      # the adapter label of base-model requests (the served base id)

    def collect(self):
        s = self.snapshot
        for name, doc, read in ENGINE_GAUGES:
            yield _gauge(name, doc, read(s))
        for name in ADAPTER_COUNTERS:
            c = CounterMetricFamily(f"loraplex_adapter_{name}", f"Adapter store {name.replace('_', ' ')}")
            c.add_metric([], float(s.adapter_counters.get(name, 0)))
            yield c
        c = CounterMetricFamily("loraplex_adapter_load_seconds", "Seconds spent loading adapters")
        c.add_metric([], float(s.adapter_counters.get("load_seconds", 0.0)))
        yield c
        for name, series, doc in (("queries", s.prefix_cache_queries, "Prompt tokens looked up in the prefix cache"),
                                  ("hits", s.prefix_cache_hits, "Prompt tokens found in the prefix cache")):
            c = CounterMetricFamily(f"loraplex_prefix_cache_{name}", doc + ", by adapter", labels=["adapter"])
            for adapter, value in sorted(series.items()):
                c.add_metric([adapter or self.base_label], float(value))
            yield c
            c = CounterMetricFamily(f"vllm:prefix_cache_{name}", doc + " (tokens)")
            c.add_metric([], float(sum(series.values())))
            yield c
        yield _gauge("vllm:num_requests_running", "Number of requests in model execution batches", s.running)
        yield _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed", s.waiting)
        yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage", s.kv_usage)
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(sorted(set(s.running_adapters))), ",".join(sorted(set(s.waiting_adapters))),
                         str(s.max_loras)], 1.0)
        yield info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class Metrics:
    """The server's metrics on its own registry (several servers may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished HTTP generation requests",
                                ["adapter", "status"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.cached_prompt_tokens = Counter("loraplex_cached_prompt_tokens",
                                            "Prompt tokens served from the prefix cache", ["adapter"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("loraplex_inter_token_latency_seconds", "Time between streamed tokens",
                                     ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_admin = Counter("loraplex_adapter_admin_operations", "Adapter load/unload API calls",
                                     ["operation", "status"], registry=r)
        self.queue_waiting = Gauge("loraplex_api_queue_waiting",
                                   "Choices admitted by the API that have no token yet (--max-queue bounds it)",
                                   registry=r)
        self.inflight = Gauge("loraplex_api_requests_in_flight", "HTTP /v1 requests being answered", registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)

    def set_base_label(self, label: str) -> None:
        self._engine.base_label = label

    def set_snapshot(self, snapshot: EngineSnapshot) -> None:
        self._engine.snapshot = snapshot

    def render(self) -> bytes:
        return generate_latest(self.registry)
