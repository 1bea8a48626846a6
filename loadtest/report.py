"""Report: summary.md of one run and compare.md of several, as markdown tables."""
from __future__ import annotations

import math
import os
from collections import Counter

from loadtest.plots import plot_run
from loadtest.record import RunRecord, save_run, write_atomic
from loadtest.stats import Distribution, Summary, adapter_summaries, run_summaries

MAX_ADAPTER_ROWS = 40
MAX_ERROR_ROWS = 10


def _f(x: float, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * scale:.{digits}f}"


def _pcts(d: Distribution, scale: float, digits: int) -> str:
    return " / ".join(_f(v, scale, digits) for v in (d.p50, d.p90, d.p99))


def _json(s: Summary) -> str:
    if not s.json_requests:
        return "-"
    return f"{s.json_valid}/{s.json_requests} ({100 * s.json_valid_rate:.0f}%)"


THROUGHPUT_HEAD = ("| {label} | sent | ok | failed | cancelled | duration s | output tok/s | req/s | JSON valid |\n"
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
LATENCY_HEAD = ("| {label} | TTFT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 | TPOT ms p50 / p90 / p99 "
                "| e2e s p50 / p90 / p99 | prompt tok mean | output tok mean |\n"
                "|---|---:|---:|---:|---:|---:|---:|")


def throughput_rows(rows: list[tuple[str, Summary]]) -> list[str]:
    return [f"| {name} | {s.requests} | {s.ok} | {s.failed} | {s.cancelled} | {_f(s.duration_s)} "
            f"| {_f(s.output_tok_s)} | {_f(s.req_s, digits=2)} | {_json(s)} |" for name, s in rows]


def latency_rows(rows: list[tuple[str, Summary]]) -> list[str]:
    return [f"| {name} | {_pcts(s.ttft, 1e3, 0)} | {_pcts(s.itl, 1e3, 1)} | {_pcts(s.tpot, 1e3, 1)} "
            f"| {_pcts(s.e2e, 1.0, 2)} | {_f(s.prompt_tokens.mean)} | {_f(s.completion_tokens.mean)} |"
            for name, s in rows]


def summary_markdown(run: RunRecord, plots: list[str]) -> str:
    phases = [(s.label, s) for s in run_summaries(run)]
    lines = [f"# Load test: {run.scenario}", ""]
    if run.description:
        lines += [run.description.strip(), ""]
    lines += [f"- target: `{run.base_url}`" + (f" (model map `{run.model_map}`)" if run.model_map else ""),
              f"- started: {run.started_at}, seed {run.seed}",
              "- planned / sent per phase: " + ", ".join(f"{p.name} {p.planned}/{p.sent}" for p in run.phases),
              "", "## Throughput", "", THROUGHPUT_HEAD.format(label="phase"), *throughput_rows(phases),
              "", "## Latency", "", LATENCY_HEAD.format(label="phase"), *latency_rows(phases), "",
              "TTFT: send to first content chunk. ITL: gap between content chunks (a chunk may carry "
              "several tokens). TPOT: (e2e - TTFT) / (output tokens - 1) per request.", ""]
    adapters = adapter_summaries(run)
    lines += ["## Per adapter", ""]
    if len(adapters) > MAX_ADAPTER_ROWS:
        lines += [f"{len(adapters)} adapters; the {MAX_ADAPTER_ROWS} with most requests:", ""]
    lines += ["| adapter | sent | ok | failed | TTFT ms p50 | ITL ms p50 | e2e s p50 | JSON valid |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s.label} | {s.requests} | {s.ok} | {s.failed + s.cancelled} | {_f(s.ttft.p50, 1e3, 0)} "
              f"| {_f(s.itl.p50, 1e3, 1)} | {_f(s.e2e.p50, 1.0, 2)} | {_json(s)} |" for s in adapters[:MAX_ADAPTER_ROWS]]
    errors = Counter(r.error for r in run.requests if r.status != "ok")
    if errors:
        lines += ["", "## Errors", "", "| count | error |", "|---:|---|"]
        lines += [f"| {n} | {_cell(e)} |" for e, n in errors.most_common(MAX_ERROR_ROWS)]
    invalid = Counter(r.json_error for r in run.requests if r.json_valid is False)
    if invalid:
        lines += ["", "## Invalid JSON", "", "| count | reason |", "|---:|---|"]
        lines += [f"| {n} | {_cell(e)} |" for e, n in invalid.most_common(MAX_ERROR_ROWS)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def compare_markdown(runs: list[tuple[str, RunRecord]], plot: str | None) -> str:
    """One row per phase of each run, labelled `run` or `run/phase`."""
    rows: list[tuple[str, Summary]] = []
    for name, run in runs:
        summaries = run_summaries(run)
        for s in summaries:
            if s.label == "all":
                continue
            rows.append((name if len(run.phases) == 1 else f"{name}/{s.label}", s))
    lines = ["# Load test comparison", ""]
    lines += [f"- `{name}`: scenario {run.scenario}, target `{run.base_url}`, started {run.started_at}"
              for name, run in runs]
    lines += ["", "## Throughput", "", THROUGHPUT_HEAD.format(label="run"), *throughput_rows(rows),
              "", "## Latency", "", LATENCY_HEAD.format(label="run"), *latency_rows(rows)]
    if plot:
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")[:200]


def write_outputs(run: RunRecord, out_dir: str) -> list[str]:
    """results.json, the plots and summary.md in out_dir; returns the file names."""
    os.makedirs(out_dir, exist_ok=True)
    save_run(run, os.path.join(out_dir, "results.json"))
    plots = plot_run(run, out_dir)
    write_atomic(os.path.join(out_dir, "summary.md"), summary_markdown(run, plots).encode("utf-8"))
    return ["results.json", "summary.md", *plots]
