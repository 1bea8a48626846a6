"""`python -m loadtest` (also `loraplex loadtest`): run | compare | bench-local | peers | scenarios."""
from __future__ import annotations

import argparse
import os
import sys

from loadtest.bench import BenchError, add_arguments
from loadtest.localserver import ServerStartError
from loadtest.modelmap import ModelMapError, load_model_map
from loadtest.peers import add_arguments as add_peers_arguments
from loadtest.preflight import PreflightError
from loadtest.scenario import ScenarioError, bundled_names, load_scenario


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loadtest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario against an OpenAI-compatible endpoint")
    p.add_argument("scenario", help="scenario YAML file, or a bundled name: " + ", ".join(bundled_names()))
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"),
                   help="sent as Bearer token (default: $LOADTEST_API_KEY)")
    p.add_argument("--model-map", default=None, help="YAML/JSON: scenario adapter name -> model (+ body fields)")
    p.add_argument("--out", required=True, help="folder for results.json, summary.md and plots")
    p.add_argument("--map-missing", action="store_true",
                   help="send scenario labels the server does not serve to the adapters it does serve")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("compare", help="overlay several runs in one table and one figure")
    p.add_argument("runs", nargs="+", help="run folders (each holding results.json)")
    p.add_argument("--out", required=True, help="folder for compare.md and compare.png")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: folder names)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("bench-local", help="random adapters + local `loraplex serve` + a scenario (make bench)")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench_local)

    p = sub.add_parser("peers", help="loraplex and the peer servers under the same loads, in one run")
    add_peers_arguments(p)
    p.set_defaults(func=_cmd_peers)

    p = sub.add_parser("scenarios", help="list the bundled scenarios")
    p.set_defaults(func=_cmd_scenarios)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from loadtest.preflight import check
    from loadtest.report import write_outputs
    from loadtest.runner import Runner

    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = replace(scenario, seed=args.seed)
    model_map = check(scenario, args.base_url, args.api_key, load_model_map(args.model_map), args.map_missing)
    if model_map.source.endswith("--map-missing"):
        print("loadtest: --map-missing: " + ", ".join(f"{k} -> {v.model}" for k, v in model_map.entries.items()))
    run = Runner(scenario, args.base_url, args.api_key, model_map, progress=not args.no_progress).run()
    files = write_outputs(run, args.out)
    ok = sum(r.status == "ok" for r in run.requests)
    print(f"loadtest: {ok}/{len(run.requests)} requests ok; wrote {', '.join(files)} to {args.out}")
    return 0 if ok else 1


def _cmd_peers(args: argparse.Namespace) -> int:
    from loadtest.peers import run_peers
    return run_peers(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from loadtest.plots import plot_compare
    from loadtest.record import load_run, write_atomic
    from loadtest.report import compare_markdown

    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(d)) for d in args.runs]
    if len(labels) != len(args.runs):
        raise ScenarioError(f"--labels has {len(labels)} labels for {len(args.runs)} runs")
    runs = []
    for label, d in zip(labels, args.runs):
        try:
            runs.append((label, load_run(d)))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ScenarioError(f"cannot read run {d}: {e}") from e
    os.makedirs(args.out, exist_ok=True)
    plot_compare(runs, os.path.join(args.out, "compare.png"))
    write_atomic(os.path.join(args.out, "compare.md"), compare_markdown(runs, "compare.png").encode("utf-8"))
    print(f"loadtest: wrote compare.md and compare.png to {args.out}")
    return 0


def _cmd_bench_local(args: argparse.Namespace) -> int:
    from loadtest.bench import bench_local
    return bench_local(args)


def _cmd_scenarios(args: argparse.Namespace) -> int:
    for name in bundled_names():
        s = load_scenario(name)
        print(f"{name}: {s.description.strip().splitlines()[0] if s.description else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ScenarioError, ModelMapError, BenchError, ServerStartError, PreflightError) as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
