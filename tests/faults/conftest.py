"""A live server of its own for the fault-injection suite (so its KV and queue checks see
only its own traffic), with a request timeout and a small body limit to probe."""
from __future__ import annotations

import signal
import sys
import time

import pytest

from tests.e2e.conftest import start_server

MAX_BODY = 2 * 2**20          # --max-request-bytes of the faults server


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("faults"),
                          ["--max-queue", "64", "--max-request-bytes", str(MAX_BODY), "--request-timeout", "300"])
    yield server
    server.stop(signal.SIGTERM)
    if server.proc.returncode != 0:
        sys.stderr.write(server.log_tail())


def assert_nothing_left(server) -> dict:
    """After the traffic: no request running or waiting, no KV block used, nothing queued or in
    flight (read from /metrics, once the last aborts have landed at the next engine step)."""
    for _ in range(50):
        m = server.metrics()
        if m["loraplex_requests_running"] == 0 and m["loraplex_kv_cache_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m["loraplex_requests_running"] == 0 and m["loraplex_requests_waiting"] == 0
    assert m["loraplex_kv_cache_blocks_used"] == 0 and m["loraplex_api_queue_waiting"] == 0
    assert m["loraplex_api_requests_in_flight"] == 0
    return m
