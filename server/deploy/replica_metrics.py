"""ReplicaMetrics: an engine replica's engine and adapter-store series, through Ray's metrics export.

The same names and meanings as the single server's /metrics (server/api/metrics.py); Ray's
exporter prefixes them with "ray_", and each carries a `replica` tag (the Serve replica id,
the value of the x-loraplex-replica header). Refreshed from the engine's snapshot every
REFRESH_S. The request-level series (requests, tokens, latencies) are the ingress's, on the
app's own /metrics, with the engine series of all replicas together (replica_board.py).
"""
from __future__ import annotations

from ray.util.metrics import Counter, Gauge

from server.api.metrics import ADAPTER_COUNTERS, ENGINE_GAUGES
from server.engine.client import EngineSnapshot

REFRESH_S = 1.0


class ReplicaMetrics:
    def __init__(self, replica: str) -> None:
        self._gauges = [(Gauge(name, doc, tag_keys=("replica",)), read) for name, doc, read in ENGINE_GAUGES]
        names = [*ADAPTER_COUNTERS, "load_seconds"]
        self._counters = {name: Counter(f"loraplex_adapter_{name}", f"Adapter store {name.replace('_', ' ')}",
                                        tag_keys=("replica",)) for name in names}
        self._prefix = {kind: Counter(f"loraplex_prefix_cache_{kind}", f"Prompt tokens {kind} in the prefix cache",
                                      tag_keys=("replica", "adapter")) for kind in ("queries", "hits")}
        self._log_version = Gauge("loraplex_adapter_log_version",
                                  "The adapter log's version this replica has applied", tag_keys=("replica",))
        for metric in (self._log_version, *(g for g, _ in self._gauges), *self._counters.values(),
                       *self._prefix.values()):
            metric.set_default_tags({"replica": replica})
        self._seen: dict[tuple[str, str], float] = {}    # cumulative values already counted

    def update(self, s: EngineSnapshot, base_label: str, log_version: int) -> None:
        self._log_version.set(float(log_version))
        for gauge, read in self._gauges:
            gauge.set(float(read(s)))
        for name, counter in self._counters.items():
            self._add(counter, ("adapter", name), float(s.adapter_counters.get(name, 0.0)), None)
        for kind, series in (("queries", s.prefix_cache_queries), ("hits", s.prefix_cache_hits)):
            for adapter, value in series.items():
                label = adapter or base_label
                self._add(self._prefix[kind], (kind, label), float(value), {"adapter": label})

    def _add(self, counter: Counter, key: tuple[str, str], total: float, tags: dict | None) -> None:
        delta = total - self._seen.get(key, 0.0)
        if delta > 0:
            counter.inc(delta, tags=tags)
            self._seen[key] = total
