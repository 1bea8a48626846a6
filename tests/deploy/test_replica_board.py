"""ReplicaBoard: the app's engine snapshot is every live replica's, summed."""
from __future__ import annotations

from server.deploy import replica_board
from server.deploy.replica_board import ReplicaBoard, combine
from server.engine.client import EngineSnapshot


def _snap(running: int, used: int, adapters: tuple[str, ...], loads: float, hits: dict) -> EngineSnapshot:
    return EngineSnapshot(running=running, waiting=1, kv_blocks_total=100, kv_blocks_used=used, max_loras=4,
                          device_slots_used=len(adapters), running_adapters=adapters,
                          adapter_counters={"loads": loads}, prefix_cache_hits=hits, kv_blocks_cached=2)


def test_counts_pools_and_counters_add_up():
    s = combine([_snap(3, 10, ("a", "b"), 2, {"": 5, "a": 1}), _snap(1, 30, ("c",), 1, {"a": 4})])
    assert (s.running, s.waiting, s.kv_blocks_total, s.kv_blocks_used) == (4, 2, 200, 40)
    assert s.kv_usage == 0.2 and s.max_loras == 8 and s.device_slots_used == 3
    assert s.running_adapters == ("a", "b", "c") and s.adapter_counters == {"loads": 3}
    assert s.prefix_cache_hits == {"": 5, "a": 5} and s.kv_blocks_cached == 4
    assert combine([]) == EngineSnapshot()


def test_a_replica_not_heard_from_drops_out(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(replica_board.time, "monotonic", lambda: now[0])
    board = ReplicaBoard()
    board.report("r1", _snap(2, 10, ("a",), 1, {}))
    board.report("r2", _snap(5, 20, (), 1, {}))
    assert board.combined().running == 7
    board.report("r1", _snap(1, 10, ("a",), 1, {}))      # the latest report replaces the last
    assert board.combined().running == 6
    now[0] += replica_board.STALE_S + 1                   # r2 died; r1 reports again
    board.report("r1", _snap(1, 10, ("a",), 1, {}))
    assert board.combined().running == 1
