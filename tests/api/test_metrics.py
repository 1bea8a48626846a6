"""server/api/metrics.py: per-app registries, loraplex_* and vLLM-named series from a snapshot."""
from prometheus_client.parser import text_string_to_metric_families

from server.api.metrics import ADAPTER_COUNTERS, Metrics
from server.engine.client import EngineSnapshot


def _samples(m: Metrics) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_apps_do_not_share_series():
    a, b = Metrics(), Metrics()
    a.requests.labels("acme", "ok").inc(3)
    assert _samples(a)[("loraplex_requests_total", (("adapter", "acme"), ("status", "ok")))] == 3
    assert ("loraplex_requests_total", (("adapter", "acme"), ("status", "ok"))) not in _samples(b)


def test_snapshot_becomes_gauges_and_vllm_names():
    m = Metrics()
    m.set_snapshot(EngineSnapshot(running=3, waiting=5, kv_blocks_total=200, kv_blocks_used=50, max_loras=8,
                                  device_slots_used=2, running_adapters=["b", "a", "a"], waiting_adapters=["c"],
                                  adapter_counters={"loads": 4, "device_misses": 2, "load_seconds": 0.75}))
    s = _samples(m)
    assert s[("loraplex_requests_running", ())] == 3 and s[("vllm:num_requests_running", ())] == 3
    assert s[("loraplex_requests_waiting", ())] == 5 and s[("vllm:num_requests_waiting", ())] == 5
    assert s[("loraplex_kv_cache_usage_ratio", ())] == 0.25 and s[("vllm:kv_cache_usage_perc", ())] == 0.25
    assert s[("loraplex_lora_device_slots_used", ())] == 2
    assert s[("loraplex_adapter_loads_total", ())] == 4
    assert s[("loraplex_adapter_device_misses_total", ())] == 2
    assert s[("loraplex_adapter_load_seconds_total", ())] == 0.75
    assert all(("loraplex_adapter_" + n + "_total", ()) in s for n in ADAPTER_COUNTERS)
    info = [k for k in s if k[0] == "vllm:lora_requests_info"]
    assert info == [("vllm:lora_requests_info", (("max_lora", "8"), ("running_lora_adapters", "a,b"),
                                                   ("waiting_lora_adapters", "c")))]


def test_latency_histograms_count_observations():
    m = Metrics()
    for v in (0.004, 0.2, 3.0):
        m.ttft.labels("base").observe(v)
    s = _samples(m)
    assert s[("loraplex_time_to_first_token_seconds_count", (("adapter", "base"),))] == 3
    assert s[("loraplex_time_to_first_token_seconds_bucket", (("adapter", "base"), ("le", "0.005")))] == 1
    assert s[("loraplex_time_to_first_token_seconds_bucket", (("adapter", "base"), ("le", "0.25")))] == 2


def test_empty_pool_reports_zero_usage():
    assert EngineSnapshot().kv_usage == 0.0
