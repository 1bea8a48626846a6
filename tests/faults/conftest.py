"""A live server of its own for the fault-injection suite (so its KV and queue checks see
only its own traffic), with a request timeout and a small body limit to probe."""
from __future__ import annotations

import signal
import sys

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
