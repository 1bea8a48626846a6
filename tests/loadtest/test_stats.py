import math

import numpy as np
import pytest

from loadtest.record import PhaseRecord, RequestRecord, RunRecord
from loadtest.stats import adapter_summaries, describe, percentile, run_summaries, summarize, throughput_series


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(n, q):
    x = np.random.default_rng(n).lognormal(size=n).tolist()
    assert percentile(x, q) == pytest.approx(float(np.percentile(x, q)), rel=1e-12)


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_describe_known_data():
    d = describe([float(v) for v in range(1, 101)])
    assert (d.n, d.mean, d.min, d.max) == (100, 50.5, 1.0, 100.0)
    assert d.p50 == pytest.approx(50.5) and d.p90 == pytest.approx(90.1) and d.p99 == pytest.approx(99.01)


def rec(i, adapter="a1", status="ok", start=0.0, ttft=0.1, itl=(0.05, 0.05, 0.05), tokens=4, schema=None,
        valid=None, phase="main"):
    e2e = ttft + sum(itl) if status == "ok" else 0.01
    return RequestRecord(index=i, phase=phase, adapter=adapter, model=adapter, schema=schema, max_tokens=4,
                         start=start, status=status, ttft=ttft if status == "ok" else None,
                         itl=list(itl) if status == "ok" else [], e2e=e2e, prompt_tokens=10,
                         completion_tokens=tokens if status == "ok" else None, chunks=len(itl) + 1,
                         json_valid=valid, usage_reported=True)


def test_summarize_counts_rates_and_json():
    rs = [rec(0), rec(1, start=0.5, ttft=0.3), rec(2, status="error"), rec(3, status="cancelled"),
          rec(4, schema="book", valid=True), rec(5, schema="book", valid=False)]
    s = summarize("x", rs, duration_s=2.0)
    assert (s.requests, s.ok, s.failed, s.cancelled) == (6, 4, 1, 1)
    assert s.output_tokens == 16 and s.output_tok_s == 8.0 and s.req_s == 2.0
    assert (s.json_requests, s.json_valid, s.json_valid_rate) == (2, 1, 0.5)
    assert s.ttft.n == 4 and s.ttft.max == pytest.approx(0.3)
    assert s.itl.n == 12 and s.itl.p50 == pytest.approx(0.05)
    assert s.tpot.p50 == pytest.approx(0.05)  # (e2e - ttft) / (4 - 1)


def test_throughput_series_sums_to_the_tokens():
    r = rec(0, start=1.0, ttft=0.2, itl=(0.5, 0.5, 0.5), tokens=8)  # 4 chunks carrying 2 tokens each
    t, rate = throughput_series([r, rec(1, status="error")], bin_s=0.5)
    assert t == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert sum(x * 0.5 for x in rate) == pytest.approx(8.0)
    assert rate[2] == pytest.approx(4.0) and rate[0] == 0.0  # chunk at 1.2 s -> bin [1.0, 1.5)


def test_run_and_adapter_summaries():
    run = RunRecord(scenario="s", description="", seed=0, base_url="u", model_map="", started_at="t",
                    scenario_raw={}, phases=[PhaseRecord("p1", 0.0, 1.0, 2, 2), PhaseRecord("p2", 1.0, 3.0, 2, 2)],
                    requests=[rec(0, phase="p1"), rec(1, adapter="base", phase="p1"),
                              rec(0, phase="p2"), rec(1, phase="p2", status="error")])
    rows = run_summaries(run)
    assert [r.label for r in rows] == ["p1", "p2", "all"]
    assert rows[2].requests == 4 and rows[2].duration_s == 3.0
    ad = adapter_summaries(run)
    assert [(a.label, a.requests, a.ok) for a in ad] == [("a1", 3, 2), ("base", 1, 1)]
