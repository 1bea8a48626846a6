"""Compiled against eager decode steps, alternated in one process (the only fair comparison
on a machine whose speed drifts by tens of percent within minutes).

    python -m bench.compile_ab --batch 8 --adapters 0 --rounds 12 --block 10

Starts one engine with `compile="on"` on the default model (NF4), puts `batch` requests in
flight, then runs `rounds` rounds of `block` compiled decode steps and `block` eager ones
(the model's decode_step switched off and on between blocks; the order flips each round).
Prints the compile time, both medians of the per-block mean step time, and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.step_profile import start_decoding  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402


def _block_ms(engine: Engine, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--adapters", type=int, default=0)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--block", type=int, default=10)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine = Engine(EngineConfig(adapters_dir=tmp, max_loras=max(args.adapters, 1), compile="on"))
        start_s = time.perf_counter() - t0
        compiled = engine.model.decode_step
        if compiled is None:
            print("compiling failed; see the log")
            return 1
        start_decoding(engine, tmp, args.batch, args.adapters, args.rounds * args.block * 2 + 64)
        times: dict[str, list[float]] = {"compiled": [], "eager": []}
        for r in range(args.rounds):
            for mode in (("compiled", "eager") if r % 2 == 0 else ("eager", "compiled")):
                engine.model.decode_step = compiled if mode == "compiled" else None
                times[mode].append(_block_ms(engine, args.block))
        engine.model.decode_step = compiled
    c, e = statistics.median(times["compiled"]), statistics.median(times["eager"])
    print(f"batch {args.batch}, adapters {args.adapters}, {torch.get_num_threads()} threads; engine start "
          f"{start_s:.1f} s ({compiled.compile_seconds:.1f} s compiling)")
    print(f"compiled {c:.1f} ms, eager {e:.1f} ms per decode step (medians of {args.rounds} blocks of "
          f"{args.block}); compiled/eager {c / e:.3f}")
    print("blocks, compiled:", " ".join(f"{t:.1f}" for t in times["compiled"]))
    print("blocks, eager:   ", " ".join(f"{t:.1f}" for t in times["eager"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
