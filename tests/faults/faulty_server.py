"""`python -m tests.faults.faulty_server serve ...`: `loraplex serve` whose forward fails like a
GPU out of memory whenever a request with seed TRIGGER_SEED is in the batch. Only the
fault-injection tests start it; nothing under server/ knows about it."""
from __future__ import annotations

import sys

import torch

from server.engine.runner import Runner

TRIGGER_SEED = 424242
_real_run = Runner.run


def _run(self, sched):
    if any(r.params.seed == TRIGGER_SEED for r in sched.requests):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    return _real_run(self, sched)


if __name__ == "__main__":
    Runner.run = _run
    from server.cli import main
    sys.exit(main(sys.argv[1:]))
