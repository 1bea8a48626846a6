"""ReplicaBoard: the engine replicas' latest snapshots, combined into the app's own.

Each replica reports its EngineSnapshot every second (replica.py's refresh loop); the
ingress's /metrics reads `combined()`, so the app's engine series (requests running and
waiting, KV blocks, slots, adapter-store counters) describe every replica together, as a
single server's describe it. A replica not heard from for STALE_S (dead, replaced) no longer
counts. Cumulative counters of a replaced replica start again from zero, as a restarted
single server's do. Per-replica series are in Ray's metrics export (replica_metrics.py).
"""
from __future__ import annotations

import time
from collections import Counter

from server.engine.client import EngineSnapshot

STALE_S = 5.0


def combine(snapshots: list[EngineSnapshot]) -> EngineSnapshot:
    """Counts and pools summed, adapter lists joined, counters summed per key."""
    def total(attr: str) -> dict:
        out: Counter = Counter()
        for s in snapshots:
            out.update(getattr(s, attr))
        return dict(out)
    return EngineSnapshot(
        running=sum(s.running for s in snapshots), waiting=sum(s.waiting for s in snapshots),
        kv_blocks_total=sum(s.kv_blocks_total for s in snapshots),
        kv_blocks_used=sum(s.kv_blocks_used for s in snapshots),
        max_loras=sum(s.max_loras for s in snapshots),
        device_slots_used=sum(s.device_slots_used for s in snapshots),
        running_adapters=tuple(a for s in snapshots for a in s.running_adapters),
        waiting_adapters=tuple(a for s in snapshots for a in s.waiting_adapters),
        preemptions=sum(s.preemptions for s in snapshots),
        adapter_counters=total("adapter_counters"),
        prefix_cache_queries=total("prefix_cache_queries"), prefix_cache_hits=total("prefix_cache_hits"),
        kv_blocks_cached=sum(s.kv_blocks_cached for s in snapshots))


class ReplicaBoard:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, EngineSnapshot]] = {}

    def report(self, replica: str, snapshot: EngineSnapshot) -> None:
        self._latest[replica] = (time.monotonic(), snapshot)

    def combined(self) -> EngineSnapshot:
        now = time.monotonic()
        self._latest = {k: v for k, v in self._latest.items() if now - v[0] <= STALE_S}
        return combine([s for _, s in self._latest.values()])
