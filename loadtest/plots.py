"""Plots (PNG, matplotlib's Agg renderer, no display): throughput over time, TTFT and ITL CDFs.

Figures are built as matplotlib.figure.Figure objects (no pyplot global state) and
written to a temp file, then renamed.
"""
from __future__ import annotations

import io
import os

from matplotlib.figure import Figure

from loadtest.record import RequestRecord, RunRecord, write_atomic
from loadtest.stats import throughput_series


def _save(fig: Figure, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buf.getvalue())


def _bin_s(run: RunRecord) -> float:
    end = max((p.end for p in run.phases), default=1.0)
    return max(0.25, round(end / 60.0, 2))


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    x = sorted(values)
    return x, [(i + 1) / len(x) for i in range(len(x))]


def _ok(records: list[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.status == "ok"]


def _draw_throughput(ax, run: RunRecord, label: str | None, color: str | None = None) -> None:
    t, rate = throughput_series(run.requests, _bin_s(run))
    ax.step(t, rate, where="post", label=label, color=color)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(True, alpha=0.3)


def _draw_cdfs(ax_ttft, ax_itl, records: list[RequestRecord], label: str, color: str | None = None) -> None:
    ok = _ok(records)
    ttft = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    itl = [g * 1e3 for r in ok for g in r.itl]
    if ttft:
        ax_ttft.step(*_cdf(ttft), where="post", label=label, color=color)
    if itl:
        ax_itl.step(*_cdf(itl), where="post", label=label, color=color)
    for ax, name in ((ax_ttft, "TTFT (ms)"), (ax_itl, "inter-token latency (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if ax is ax_ttft else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)


def plot_run(run: RunRecord, out_dir: str) -> list[str]:
    """throughput.png, ttft_cdf.png and itl_cdf.png in out_dir; returns the file names."""
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    _draw_throughput(ax, run, None)
    for p in run.phases[1:]:
        ax.axvline(p.start, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(f"{run.scenario}: output throughput")
    _save(fig, os.path.join(out_dir, "throughput.png"))

    figs = {"ttft_cdf.png": Figure(figsize=(6, 4)), "itl_cdf.png": Figure(figsize=(6, 4))}
    ax_ttft = figs["ttft_cdf.png"].add_subplot()
    ax_itl = figs["itl_cdf.png"].add_subplot()
    for p in run.phases:
        _draw_cdfs(ax_ttft, ax_itl, run.phase_requests(p.name), p.name)
    ax_ttft.set_title(f"{run.scenario}: TTFT CDF")
    ax_itl.set_title(f"{run.scenario}: ITL CDF")
    for name, fig in figs.items():
        if len(run.phases) > 1:
            fig.axes[0].legend()
        _save(fig, os.path.join(out_dir, name))
    return ["throughput.png", "ttft_cdf.png", "itl_cdf.png"]


def plot_compare(runs: list[tuple[str, RunRecord]], path: str) -> None:
    """One figure, three panels: throughput over time, TTFT CDF, ITL CDF; a line per run/phase."""
    fig = Figure(figsize=(16, 4.5))
    ax_tp, ax_ttft, ax_itl = fig.subplots(1, 3)
    n = 0  # one colour per run/phase line, the same in every panel
    for name, run in runs:
        _draw_throughput(ax_tp, run, name, f"C{n % 10}")
        for p in run.phases:
            label = name if len(run.phases) == 1 else f"{name}/{p.name}"
            _draw_cdfs(ax_ttft, ax_itl, run.phase_requests(p.name), label, f"C{n % 10}")
            n += 1
    ax_tp.set_title("output throughput")
    ax_ttft.set_title("TTFT CDF")
    ax_itl.set_title("ITL CDF")
    for ax in (ax_tp, ax_ttft, ax_itl):
        ax.legend(fontsize="small")
    _save(fig, path)
