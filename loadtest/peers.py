"""`loadtest peers`: loraplex and the peer servers under the same loads, one after another,
in one run, with the CPU each server used; one table (peers.md) and one figure (peers.png).

    python -m loadtest peers --peers-dir ../shared/peers --adapters /tmp/peers/adapters4 --out OUT \
        [--servers loraplex,vllm,vllm-lora,llamacpp,llamacpp-lora,loraplex-no-prefix-cache] \
        [--scenarios peers-base,peers-adapters,cpu-reference]

The peers are started by the scripts in --peers-dir (serve-vllm-cpu.sh, serve-llamacpp.sh;
their setup scripts install them, outside the project), loraplex by `loraplex serve`. The
adapters folder holds PEFT adapters a1..aN (make-adapters.sh writes them, with GGUF copies
in DIR-gguf for llama.cpp). A server without adapters skips the scenarios that need them.
Each server runs alone: it is started, warmed with a few requests, measured on every
scenario, and stopped (its whole process group) before the next one starts. CPU used is the
user + system time of the server's process group over a scenario's wall time, in cores.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace


from loadtest.localserver import ServerStartError, free_port, wait_ready
from loadtest.modelmap import ModelMap, load_model_map, parse_model_map
from loadtest.record import save_run, write_atomic
from loadtest.runner import Runner
from loadtest.scenario import Scenario, load_scenario
from loadtest.stats import run_summaries

MAPS = os.path.join(os.path.dirname(__file__), "maps")


@dataclass(frozen=True)
class Peer:
    name: str
    command: list[str]          # {port} is replaced by the port
    model_map: ModelMap
    adapters: bool              # serves the adapters a1..aN
    ready_path: str = "/v1/models"


def peers(peers_dir: str, adapters_dir: str, python: str) -> dict[str, Peer]:
    vllm_base = os.environ.get("PEERS", "/tmp/peers") + "/vllm/model"  # the folder serve-vllm-cpu.sh serves
    vllm_map = parse_model_map({"base": vllm_base, "*": {"model": "{name}"}}, "vllm")
    loraplex = [python, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "{port}",
                "--adapters-dir", adapters_dir]
    vllm = ["bash", os.path.join(peers_dir, "serve-vllm-cpu.sh"), "{port}"]
    llama = ["bash", os.path.join(peers_dir, "serve-llamacpp.sh"), "{port}"]
    return {
        "loraplex": Peer("loraplex", loraplex, ModelMap(), True, "/ready"),
        "loraplex-compiled": Peer("loraplex-compiled", loraplex + ["--compile", "on"], ModelMap(), True, "/ready"),
        "loraplex-no-prefix-cache": Peer("loraplex-no-prefix-cache", loraplex + ["--no-enable-prefix-caching"],
                                         ModelMap(), True, "/ready"),
        "vllm": Peer("vllm", vllm, vllm_map, False),
        "vllm-lora": Peer("vllm-lora", vllm + ["--lora", adapters_dir], vllm_map, True),
        "llamacpp": Peer("llamacpp", llama, load_model_map(os.path.join(MAPS, "llamacpp.yaml")), False, "/health"),
        "llamacpp-lora": Peer("llamacpp-lora", llama + ["--lora", adapters_dir],
                              load_model_map(os.path.join(MAPS, "llamacpp.yaml")), True, "/health"),
    }


def group_cpu_s(pgid: int) -> float:
    """User + system seconds of every live process in process group pgid, and of the children
    its leader has reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
            if int(pid) == pgid:
                total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / tick


class Running:
    """One peer server in its own process group on 127.0.0.1."""

    def __init__(self, peer: Peer, log_path: str, ready_timeout_s: float) -> None:
        self.peer = peer
        self.port = free_port()
        cmd = [c.replace("{port}", str(self.port)) for c in peer.command]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE")))
        self.log_path = log_path
        try:
            wait_ready(self.proc, self.base_url + peer.ready_path, ready_timeout_s, peer.name)
        except ServerStartError as e:
            self.stop()
            raise ServerStartError(f"{e}; see {log_path}") from None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of the group left behind
        except ProcessLookupError:
            pass


def _warm_up(scenario: Scenario) -> Scenario:
    """The scenario's first 8 requests, sent before it is measured (first-request costs:
    adapter loads, grammar compiles, lazy initialisation)."""
    first = replace(scenario.phases[0], requests=min(8, scenario.phases[0].requests))
    return replace(scenario, name=scenario.name + "-warm-up", phases=(first,))


def _needs_adapters(scenario: Scenario) -> bool:
    return any(p.adapters.popularity != "base" for p in scenario.phases)


def measure(peer: Peer, scenarios: list[Scenario], out: str, ready_timeout_s: float) -> list[dict]:
    rows = []
    server = Running(peer, os.path.join(out, f"{peer.name}.log"), ready_timeout_s)
    try:
        for scenario in scenarios:
            if _needs_adapters(scenario) and not peer.adapters:
                continue
            Runner(_warm_up(scenario), server.base_url, None, peer.model_map, progress=False).run()
            cpu0, t0 = group_cpu_s(server.proc.pid), time.monotonic()
            run = Runner(scenario, server.base_url, None, peer.model_map, progress=False).run()
            wall, cpu = time.monotonic() - t0, group_cpu_s(server.proc.pid) - cpu0
            folder = os.path.join(out, f"{peer.name}-{scenario.name}")
            os.makedirs(folder, exist_ok=True)
            save_run(run, os.path.join(folder, "results.json"))
            s = run_summaries(run)[0]
            rows.append({"server": peer.name, "scenario": scenario.name, "ok": s.ok, "requests": s.requests,
                         "output_tok_s": s.output_tok_s, "cpu_cores": cpu / wall, "run": run,
                         "ttft_p50": s.ttft.p50, "ttft_p99": s.ttft.p99,
                         "json_valid": f"{s.json_valid}/{s.json_requests}" if s.json_requests else ""})
            print(f"peers: {peer.name} {scenario.name}: {s.output_tok_s:.1f} tok/s, {s.ok}/{s.requests} ok, "
                  f"{cpu / wall:.2f} cores", flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict], scenarios: list[str], load: str) -> str:
    lines = ["# loraplex and its peers, one run", "", f"Machine load before the run: {load}", "",
             "| server | " + " | ".join(f"{s} tok/s (cores)" for s in scenarios) + " |",
             "|---|" + "---|" * len(scenarios)]
    for server in dict.fromkeys(r["server"] for r in rows):
        cells = []
        for s in scenarios:
            r = next((r for r in rows if r["server"] == server and r["scenario"] == s), None)
            cells.append("–" if r is None else f"{r['output_tok_s']:.1f} ({r['cpu_cores']:.2f})"
                         + ("" if r["ok"] == r["requests"] else f" {r['ok']}/{r['requests']} ok")
                         + (f" json {r['json_valid']}" if r["json_valid"] else ""))
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    lines += ["", "Time to first token, p50 / p99 (s):", "",
              "| server | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for server in dict.fromkeys(r["server"] for r in rows):
        cells = []
        for s in scenarios:
            r = next((r for r in rows if r["server"] == server and r["scenario"] == s), None)
            cells.append("–" if r is None else f"{r['ttft_p50']:.3f} / {r['ttft_p99']:.3f}")
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "![peers.png](peers.png)", ""])


def run_peers(args: argparse.Namespace) -> int:
    from loadtest.plots import plot_compare
    os.makedirs(args.out, exist_ok=True)
    table_peers = peers(os.path.abspath(args.peers_dir), os.path.abspath(args.adapters), sys.executable)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in table_peers]
    if unknown:
        raise ServerStartError(f"unknown servers {unknown}; known: {', '.join(table_peers)}")
    scenarios = [load_scenario(s) for s in args.scenarios.split(",")]
    load = open("/proc/loadavg").read().strip()
    rows: list[dict] = []
    for name in names:
        rows += measure(table_peers[name], scenarios, args.out, args.ready_timeout)
    write_atomic(os.path.join(args.out, "peers.md"), table(rows, [s.name for s in scenarios], load).encode())
    plot_compare([(f"{r['server']}/{r['scenario']}", r["run"]) for r in rows], os.path.join(args.out, "peers.png"))
    print(open(os.path.join(args.out, "peers.md")).read())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers-dir", required=True, help="folder of the peer scripts (serve-vllm-cpu.sh, ...)")
    p.add_argument("--adapters", required=True, help="PEFT adapters a1..aN (and DIR-gguf for llama.cpp)")
    p.add_argument("--out", required=True, help="folder for peers.md, peers.png, logs and each run")
    p.add_argument("--servers", default="loraplex,vllm,vllm-lora,llamacpp,llamacpp-lora")
    p.add_argument("--scenarios", default="peers-base,peers-adapters,cpu-reference")
    p.add_argument("--ready-timeout", type=float, default=600.0)
