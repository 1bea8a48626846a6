"""Statistics of a run: percentiles, per-phase and per-adapter summaries, throughput series.

Percentiles interpolate linearly between order statistics (numpy's default "linear"
method): for sorted x of length n, the q-th percentile sits at rank h = (n-1)·q/100.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from loadtest.record import RequestRecord, RunRecord


def percentile(values: list[float], q: float) -> float:
    """q in [0, 100]; NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    x = sorted(values)
    h = (len(x) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (h - lo) * (x[hi] - x[lo])


@dataclass(frozen=True)
class Distribution:
    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


def describe(values: list[float]) -> Distribution:
    if not values:
        return Distribution(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Distribution(n=len(values), mean=sum(values) / len(values), p50=percentile(values, 50),
                        p90=percentile(values, 90), p99=percentile(values, 99), min=min(values), max=max(values))


@dataclass(frozen=True)
class Summary:
    label: str
    requests: int                     # sent
    ok: int
    failed: int
    cancelled: int
    duration_s: float
    output_tokens: int                # completion tokens of ok requests
    output_tok_s: float
    req_s: float                      # ok requests per second
    ttft: Distribution
    itl: Distribution                 # gaps between content chunks, all ok requests pooled
    tpot: Distribution                # per request: (e2e - ttft) / (completion_tokens - 1)
    e2e: Distribution
    prompt_tokens: Distribution
    completion_tokens: Distribution
    json_requests: int                # ok requests that carried a schema
    json_valid: int

    @property
    def json_valid_rate(self) -> float:
        return self.json_valid / self.json_requests if self.json_requests else math.nan


def summarize(label: str, records: list[RequestRecord], duration_s: float) -> Summary:
    ok = [r for r in records if r.status == "ok"]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in ok
            if r.ttft is not None and r.e2e is not None and (r.completion_tokens or 0) > 1]
    json_ok = [r for r in ok if r.schema is not None]
    dur = max(duration_s, 1e-9)
    return Summary(
        label=label, requests=len(records), ok=len(ok),
        failed=sum(r.status == "error" for r in records), cancelled=sum(r.status == "cancelled" for r in records),
        duration_s=duration_s, output_tokens=out_tokens, output_tok_s=out_tokens / dur, req_s=len(ok) / dur,
        ttft=describe([r.ttft for r in ok if r.ttft is not None]),
        itl=describe([g for r in ok for g in r.itl]), tpot=describe(tpot),
        e2e=describe([r.e2e for r in ok if r.e2e is not None]),
        prompt_tokens=describe([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        completion_tokens=describe([r.completion_tokens for r in ok if r.completion_tokens is not None]),
        json_requests=len(json_ok), json_valid=sum(bool(r.json_valid) for r in json_ok))


def run_summaries(run: RunRecord) -> list[Summary]:
    """One summary per phase, plus an `all` row when there are several phases."""
    rows = [summarize(p.name, run.phase_requests(p.name), p.end - p.start) for p in run.phases]
    if len(run.phases) > 1:
        rows.append(summarize("all", run.requests, sum(p.end - p.start for p in run.phases)))
    return rows


def adapter_summaries(run: RunRecord) -> list[Summary]:
    """One summary per adapter label over the whole run, most requests first."""
    by: dict[str, list[RequestRecord]] = {}
    for r in run.requests:
        by.setdefault(r.adapter, []).append(r)
    total = sum(p.end - p.start for p in run.phases)
    rows = [summarize(a, recs, total) for a, recs in by.items()]
    return sorted(rows, key=lambda s: (-s.requests, _natural(s.label)))


def _natural(label: str) -> list:
    """Sort key that puts a2 before a10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]


def throughput_series(records: list[RequestRecord], bin_s: float) -> tuple[list[float], list[float]]:
    """Output tokens/s in bins of bin_s seconds: (bin start times, rates).

    Each content chunk of an ok request counts completion_tokens / chunks tokens, so the
    series sums to the reported token count even when a chunk carries several tokens.
    """
    if bin_s <= 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s}")
    times: list[tuple[float, float]] = []
    for r in records:
        if r.status != "ok" or not r.chunks:
            continue
        w = (r.completion_tokens or r.chunks) / r.chunks
        times.extend((t, w) for t in r.token_times())
    if not times:
        return [], []
    n_bins = int(max(t for t, _ in times) // bin_s) + 1
    counts = [0.0] * n_bins
    for t, w in times:
        counts[int(t // bin_s)] += w
    return [i * bin_s for i in range(n_bins)], [c / bin_s for c in counts]
