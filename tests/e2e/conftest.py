"""A live `loraplex serve` on 127.0.0.1, shared by the e2e tests of the session.

`live_server` starts one process (default model, 16-bit weights so outputs can be compared
with transformers and PEFT, an api-keys file with three tenants, random non-zero adapters
written with server/lora's helper) and waits for /ready. `start_server` starts further
servers for tests that must own theirs (SIGTERM). Logs go to a file printed on failure.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.lora.adapter import LoraArch, write_random_adapter
from server.model.default import ensure_default_model

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 240

KEYS = {
    "acme": "sk-acme-7f3a9c21",
    "beta": "sk-beta-51d0e8b4",
    "admin": "sk-admin-c0ffee42",
    "pub1": "sk-pub1-0a1b2c3d",     # two tenants that share the "public" prefix-cache namespace
    "pub2": "sk-pub2-4e5f6a7b",
}
# adapter name -> (rank, alpha, targets, seed)
ADAPTERS = {
    "acme-support": (8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 11),
    "beta-legal": (4, 8.0, ("q_proj", "v_proj", "down_proj"), 12),
    "shared-json": (8, 8.0, ("q_proj", "v_proj", "up_proj"), 13),
}


def model_arch(model_dir: Path) -> LoraArch:
    cfg = json.loads((model_dir / "config.json").read_text())
    return LoraArch.llama(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                          cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 0))


def write_adapters(folder: Path, arch: LoraArch, names: dict = ADAPTERS) -> None:
    for name, (r, alpha, targets, seed) in names.items():
        write_random_adapter(str(folder / name), arch, r=r, alpha=alpha, targets=targets, seed=seed, std=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    adapters_dir: Path
    model_dir: Path

    def headers(self, tenant: str | None) -> dict:
        return {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels or with their labels joined into the name."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def start_server(tmp: Path, extra: list[str], quantization: str = "none", module: str = "server.cli") -> Server:
    """A `loraplex serve` process (or `python -m module serve`, a wrapper that injects faults)."""
    model_dir = ensure_default_model()
    adapters = tmp / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    write_adapters(adapters, model_arch(model_dir))
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"key": KEYS["acme"], "tenant": "acme", "adapters": ["acme-*", "shared-*"]},
        {"key": KEYS["beta"], "tenant": "beta", "adapters": ["beta-*"]},
        {"key": KEYS["admin"], "tenant": "ops", "adapters": ["*"], "admin": True},
        {"key": KEYS["pub1"], "tenant": "pub1", "adapters": [], "cache_namespace": "public"},
        {"key": KEYS["pub2"], "tenant": "pub2", "adapters": [], "cache_namespace": "public"},
    ]}))
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(port),
           "--quantization", quantization, "--adapters-dir", str(adapters), "--api-keys", str(keys),
           "--max-model-len", "1024", "--kv-cache-tokens", "4096", "--max-loras", "4", *extra]
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, adapters, model_dir)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("live"), ["--max-queue", "24"])
    yield server
    server.stop(signal.SIGTERM)
    if server.proc.returncode != 0:
        sys.stderr.write(server.log_tail())


@pytest.fixture(scope="session")
def base_id(live_server) -> str:
    return live_server.model_dir.name
