"""The point-wise CPU kernels (RMSNorm, rotary + K/V write, SiLU * up, the greedy argmax)
against the torch ops they replace, eager decode steps alternated in one process.

    python -m bench.pointwise_ab --batch 8 --adapters 0 --rounds 16 --block 5

Starts one engine on the default model (NF4), puts `batch` requests in flight, then runs
`rounds` rounds of `block` decode steps with the kernels and `block` with the torch ops
(`set_pointwise_kernel(None)` and torch's argmax; the order flips each round). Prints both
medians of the per-block mean step time and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from bench.compile_ab import _block_ms
from bench.step_profile import start_decoding
from server.config import EngineConfig
from server.engine import sampler
from server.engine.engine import Engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--adapters", type=int, default=0)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--block", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(adapters_dir=tmp, max_loras=max(args.adapters, 1)))
        kernel, argmax = engine.model.model.norm.kernel, engine.sampler.argmax
        if kernel is None:
            print("the CPU kernels are not in use here; nothing to compare")
            return 1
        start_decoding(engine, tmp, args.batch, args.adapters, args.rounds * args.block * 2 + 64)
        modes = {"kernels": (kernel, argmax), "torch": (None, sampler._torch_argmax)}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode in (("kernels", "torch") if r % 2 == 0 else ("torch", "kernels")):
                engine.model.set_pointwise_kernel(modes[mode][0])
                engine.sampler.argmax = modes[mode][1]
                times[mode].append(_block_ms(engine, args.block))
    k, t = statistics.median(times["kernels"]), statistics.median(times["torch"])
    print(f"batch {args.batch}, adapters {args.adapters}: point-wise kernels {k:.1f} ms, torch ops {t:.1f} ms "
          f"per decode step (medians of {args.rounds} blocks of {args.block}); kernels/torch {k / t:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
