"""bench-local: the whole benchmark against our own server on this machine (`make bench`).

1. plan the scenario and collect every adapter label it names (a1..a4 for cpu-reference,
   cold1..cold32 for cold-adapters);
2. write one random PEFT adapter per label (non-zero A and B, seeded by its position) into a
   fresh temporary adapters dir with server.lora.adapter.write_random_adapter, shaped for the
   served model's config.json;
3. start `loraplex serve` on 127.0.0.1 on a free port with that dir and wait for /ready;
4. run the scenario, write results.json, summary.md and plots to --out; stop the server.

This is the one module of the harness that imports the server package (to write adapters);
it does so inside the function, so `loadtest run` never needs it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import tempfile

from loadtest.localserver import LocalServer
from loadtest.modelmap import ModelMap
from loadtest.report import write_outputs
from loadtest.runner import Runner
from loadtest.scenario import load_scenario
from loadtest.workload import adapter_labels, plan_phase

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


class BenchError(RuntimeError):
    """bench-local cannot set up the local benchmark (bad model argument, no config)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="cpu-reference", help="scenario file or bundled name")
    p.add_argument("--out", default="bench-out", help="report folder")
    p.add_argument("--model", default="default", help="passed to `loraplex serve --model`")
    p.add_argument("--rank", type=int, default=8, help="rank of the generated adapters")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated target modules")
    p.add_argument("--serve-args", default="", help="extra `loraplex serve` flags, one quoted string")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /ready")
    p.add_argument("--keep-adapters", action="store_true", help="leave the generated adapters dir in place")
    p.add_argument("--no-progress", action="store_true")


def write_adapters(labels: list[str], adapters_dir: str, model: str, rank: int, alpha: float,
                   targets: tuple[str, ...]) -> None:
    """One random adapter per label, in adapters_dir/<label>, for the served model's shapes."""
    from server.lora.adapter import LoraArch, write_random_adapter

    cfg = _model_config(model)
    arch = LoraArch.llama(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                          num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                          num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                          head_dim=cfg.get("head_dim") or 0)
    for i, label in enumerate(labels):
        write_random_adapter(os.path.join(adapters_dir, label), arch, r=rank, alpha=alpha,
                             targets=targets, seed=1000 + i)


def _model_config(model: str) -> dict:
    from server.errors import ModelLoadError
    from server.model.loader import resolve_model_dir
    try:
        folder = resolve_model_dir(model)
    except ModelLoadError as e:
        raise BenchError(str(e)) from e
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def bench_local(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    labels = []
    for i in range(len(scenario.phases)):
        labels += [a for a in adapter_labels(plan_phase(scenario, i)) if a not in labels]
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    adapters_dir = tempfile.mkdtemp(prefix="loraplex-bench-adapters-")
    try:
        print(f"bench-local: writing {len(labels)} adapters (rank {args.rank}, {','.join(targets)}) "
              f"to {adapters_dir}", flush=True)
        write_adapters(labels, adapters_dir, args.model, args.rank, args.alpha, targets)
        extra = ["--model", args.model, *shlex.split(args.serve_args)]
        server = LocalServer(adapters_dir, os.path.join(args.out, "server.log"), extra, args.ready_timeout)
        print(f"bench-local: starting loraplex serve (log: {server.log_path})", flush=True)
        with server:
            print(f"bench-local: server ready at {server.base_url}; running {scenario.name}", flush=True)
            run = Runner(scenario, server.base_url, None, ModelMap(), progress=not args.no_progress).run()
        files = write_outputs(run, args.out)
        print(f"bench-local: wrote {', '.join(files)} to {args.out}", flush=True)
        with open(os.path.join(args.out, "summary.md"), encoding="utf-8") as f:
            print(f.read())
        return 0 if any(r.status == "ok" for r in run.requests) else 1
    finally:
        if args.keep_adapters:
            print(f"bench-local: adapters kept in {adapters_dir}")
        else:
            shutil.rmtree(adapters_dir, ignore_errors=True)
