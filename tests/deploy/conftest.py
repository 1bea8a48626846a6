"""The replicated app on a local Ray (127.0.0.1 only), and a single server beside it to compare with.

`ray_app` is `loraplex serve --replicas 2` with small KV pools and the e2e tenants and
adapters, plus a fourth adapter; `single` is `loraplex serve` on the same model, adapters and
keys. Both live for this package's tests only (the Ray processes hold memory and wake up).
`live_server` and `base_id` let the e2e auth cases run against the app unchanged.
"""
from __future__ import annotations

import os
import re
import signal
import sys

import httpx
import psutil
import pytest

from tests.e2e.conftest import Server, free_port, model_arch, start_server, write_adapters
from server.model.default import ensure_default_model

FOURTH = {"ops-fourth": (8, 16.0, ("q_proj", "v_proj", "o_proj", "down_proj"), 14)}
RAY_ENV = {"RAY_metrics_report_interval_ms": "500"}     # per-replica metrics exported twice a second


class RayApp(Server):
    metrics_port: int = 0

    def replica_pids(self) -> list[int]:
        """The engine replicas' processes (Ray names them ServeReplica:<app>:<deployment>)."""
        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "ServeReplica:loraplex:EngineReplica" in " ".join(p.cmdline()) or \
                        "ServeReplica:loraplex:EngineReplica" in p.name():
                    out.append(p.pid)
            except psutil.Error:
                pass
        return out

    def replica_metrics(self, name: str) -> dict[str, float]:
        """Ray's export of one per-replica series (a counter's with its _total): replica id -> value."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line.startswith(f"ray_{name}{{"):
                m = re.search(r'replica="([^"]+)"', line)
                out[m.group(1) if m else ""] = float(line.rsplit(" ", 1)[1])
        return out


def _start(tmp, extra: list[str]) -> Server:
    adapters = tmp / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    write_adapters(adapters, model_arch(ensure_default_model()), FOURTH)
    return start_server(tmp, extra)


@pytest.fixture(scope="package")
def ray_app(tmp_path_factory):
    port = free_port()
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    try:
        server = _start(tmp_path_factory.mktemp("ray"), ["--replicas", "2", "--ray-metrics-port", str(port)])
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    app = RayApp(server.url, server.proc, server.log_path, server.adapters_dir, server.model_dir)
    app.metrics_port = port
    yield app
    app.stop(signal.SIGTERM)
    if app.proc.returncode != 0:
        sys.stderr.write(app.log_tail())


@pytest.fixture(scope="package")
def single(tmp_path_factory):
    server = _start(tmp_path_factory.mktemp("single"), [])
    yield server
    server.stop(signal.SIGTERM)


@pytest.fixture(scope="package")
def live_server(ray_app):
    return ray_app


@pytest.fixture(scope="package")
def base_id(ray_app) -> str:
    return ray_app.model_dir.name
