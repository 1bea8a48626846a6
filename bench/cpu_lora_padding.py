"""What padding every adapter to max_lora_rank costs the torch LoRA path on CPU.

Rank-4 adapters held in slots of r_max = 16 / 64 / 256, one 576 -> 1536 linear (SmolLM2's
gate/up shape): ops.apply with each slot group sliced to its adapter's rank (what the
server does) against the same call with every row padded to r_max. Best of 11 runs of 30
calls, one thread.

    python bench/cpu_lora_padding.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from server.lora import ops  # noqa: E402
from server.lora.mapping import LoraBatch  # noqa: E402


def best_us(fn, n: int = 30, reps: int = 11) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    slots, d_in, d_out, rank = 8, 576, 1536, 4
    batches = {"decode 16 seqs / 8 adapters": [i % slots for i in range(16)],
               "prefill 4 x 64 tokens": [s for s in range(4) for _ in range(64)]}
    for r_max in (16, 64, 256):
        a = torch.zeros(slots, r_max, d_in)
        b = torch.zeros(slots, d_out, r_max)
        a[:, :rank] = torch.randn(slots, rank, d_in)
        b[:, :, :rank] = torch.randn(slots, d_out, rank)
        for name, rows in batches.items():
            x, y = torch.randn(len(rows), d_in), torch.randn(len(rows), d_out)
            times = []
            for seg_rank in (rank, r_max):
                lora = LoraBatch.from_row_slots(rows, [seg_rank] * len(rows), "cpu")
                lora.slot_groups()
                times.append(best_us(lambda: ops.apply(x, a, b, lora, y)))
            print(f"r_max={r_max:3d} {name:28} sliced to rank 4: {times[0]:7.1f} us   "
                  f"padded to r_max: {times[1]:7.1f} us   x{times[1] / times[0]:.2f}")


if __name__ == "__main__":
    main()
