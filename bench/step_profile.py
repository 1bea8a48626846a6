"""Where one decode step's time goes: torch's profiler over steady decode steps.

    python -m bench.step_profile --batch 8 --adapters 0 --steps 20 [--lm-head-dtype float32]

Starts an engine on the default model (NF4), puts `batch` requests in flight (with
`adapters` random adapters round-robin), runs until every request decodes, then profiles
`steps` decode steps and prints the ops by self CPU time, and the mean wall time per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.engine import write_adapters  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import Request, SamplingParams  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--adapters", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lm-head-dtype", default="auto")
    p.add_argument("--rows", type=int, default=25, help="ops to print")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(adapters_dir=tmp, max_loras=max(args.adapters, 1),
                                     lm_head_dtype=args.lm_head_dtype))
        names = write_adapters(engine, tmp, args.adapters) if args.adapters else []
        params = SamplingParams(max_tokens=args.steps * 4 + 64, temperature=0.0, ignore_eos=True)
        for i in range(args.batch):
            ids = engine.tokenizer.encode(f"Write a long story about the sea, part {i}.")
            engine.add_request(Request(ids, params, adapter=names[i % len(names)] if names else None))
        for _ in range(400):  # prefill, adapter loads, until every request decodes
            engine.step()
            snap = engine.snapshot()
            if snap.running == args.batch and snap.waiting == 0:
                break
        for _ in range(3):
            engine.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - t0) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"batch {args.batch}, adapters {args.adapters}: {wall * 1e3:.1f} ms per decode step "
          f"(unprofiled), {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
