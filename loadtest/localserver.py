"""LocalServer: a `loraplex serve` subprocess on 127.0.0.1, for `bench-local` and the e2e test.

Starts the server on a free port, waits until GET /ready answers 200, and on exit sends
SIGTERM (the server drains in-flight requests) and waits, killing it only if it hangs.
The server's output goes to a log file whose tail is quoted when start-up fails.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


class ServerStartError(RuntimeError):
    """The local server exited or did not become ready in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, name: str) -> None:
    """Poll GET url until it answers 200; ServerStartError if proc exits or time runs out
    (the caller stops the process and adds its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{name} exited with code {proc.returncode} before ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise ServerStartError(f"{name} not ready after {timeout_s} s")


class LocalServer:
    def __init__(self, adapters_dir: str, log_path: str, extra_args: list[str] | None = None,
                 ready_timeout_s: float = 900.0, python: str = sys.executable) -> None:
        self.adapters_dir = adapters_dir
        self.log_path = log_path
        self.extra_args = list(extra_args or [])
        self.ready_timeout_s = ready_timeout_s
        self.python = python
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalServer":
        self.port = free_port()
        cmd = [self.python, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--adapters-dir", self.adapters_dir, *self.extra_args]
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()  # the child holds its own descriptor
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        try:
            wait_ready(self.proc, self.base_url + "/ready", self.ready_timeout_s, "server")
        except ServerStartError as e:
            self.stop()
            raise ServerStartError(f"{e}:\n{self.log_tail()}") from None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
