"""bench/affinity.py: the routing simulation behaves as its model says."""
from __future__ import annotations

import pytest

from bench.affinity import Setting, simulate, table, zipf_weights


def test_zipf_weights():
    w = zipf_weights(4, 1.0)
    assert sum(w) == pytest.approx(1.0) and w == sorted(w, reverse=True)
    assert w[0] / w[1] == pytest.approx(2.0)
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)


def test_one_replica_routes_alike_and_enough_slots_always_hit():
    one = Setting(1, 8, 100, 1.0)
    assert simulate(one, "random", 20_000, 100).hit_rate == simulate(one, "affinity", 20_000, 100).hit_rate
    roomy = Setting(4, 8, 30, 1.0)       # 32 slots for 30 adapters: after warm-up every request hits
    r = simulate(roomy, "affinity", 20_000, 100)
    assert r.hit_rate == 1.0 and r.disk_loads_per_s == 0.0
    assert simulate(roomy, "random", 20_000, 100).hit_rate < 0.9


def test_affinity_beats_random_and_host_affinity_cuts_disk_loads():
    s = Setting(8, 8, 1000, 1.0)
    rand, slot, host = (simulate(s, router, 30_000, 100, seed=1) for router in ("random", "affinity", "affinity-host"))
    assert slot.hit_rate > rand.hit_rate + 0.2
    assert host.hit_rate > rand.hit_rate + 0.2
    assert host.disk_loads_per_s < slot.disk_loads_per_s / 2
    assert 1 / 8 <= rand.busiest < 0.2 and host.busiest >= rand.busiest   # affinity concentrates load
    assert "affinity-host" in table([host]) and simulate(s, "random", 30_000, 100, seed=1) == rand   # seeded


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Setting(0, 8, 10, 1.0)
    with pytest.raises(ValueError):
        Setting(2, 8, 10, 1.0, host=4)
    with pytest.raises(ValueError):
        simulate(Setting(2, 8, 10, 1.0), "nearest", 100, 1)
