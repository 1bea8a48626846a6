"""Where one decode step's time goes: torch's profiler over steady decode steps.

    python -m bench.step_profile --batch 8 --adapters 0 --steps 20 [--lm-head-dtype float32]

Starts an engine on the default model (NF4), puts `batch` requests in flight (with
`adapters` random adapters round-robin), runs until every request decodes, then profiles
`steps` decode steps and prints the ops by self CPU time, and the mean wall time per step.
It also measures the machine's streaming read (a float32 sum over 512 MiB, all threads) in
the same run and prints the step's byte floor: the bytes a decode step must read (NF4 codes
and absmax, the LM head as served) over that bandwidth.
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


def read_gb_s(mib: int = 512, reps: int = 5) -> float:
    """Best streaming-read bandwidth of `reps` float32 sums over `mib` MiB, in GB/s."""
    buf = torch.ones(mib * 2**20 // 4)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(reps))
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_bytes(engine: Engine) -> int:
    """Weight bytes one decode step reads: every decoder linear's codes and absmax (each
    storage once) and the LM head as served (bf16 copy or float32)."""
    from server.model.quant import quant_tensors
    model = engine.model
    tensors = [m.base.weight for m in model.lora_linears().values()]
    for m in model.lora_linears().values():
        tensors += quant_tensors(m.base)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    head = model.lm_head_bf16 if model.lm_head_bf16 is not None else model.lm_head.weight
    return sum(storages.values()) + head.numel() * head.element_size()


def start_decoding(engine: Engine, adapters_dir: str, batch: int, adapters: int, max_tokens: int) -> None:
    """Put `batch` requests in flight (with `adapters` random adapters written to
    `adapters_dir`, round-robin) and step until every one of them decodes."""
    names = write_adapters(engine, adapters_dir, adapters) if adapters else []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        ids = engine.tokenizer.encode(f"Write a long story about the sea, part {i}.")
        engine.add_request(Request(ids, params, adapter=names[i % len(names)] if names else None))
    for _ in range(400):  # prefill, adapter loads, until every request decodes
        engine.step()
        snap = engine.snapshot()
        if snap.running == batch and snap.waiting == 0:
            break


KERNEL_CALLS = ("nf4_matmul", "bf16_matmul", "paged_decode_attention", "lora_rows")


def kernel_times(engine: Engine, steps: int) -> dict[str, tuple[int, float]]:
    """(calls, seconds) per CPU kernel entry point over `steps` decode steps, each call timed
    from Python (ctypes calls are invisible to torch's profiler); {} without the kernels."""
    from server.cpu_kernel import CpuKernel
    spent: dict[str, list] = {name: [0, 0.0] for name in KERNEL_CALLS}
    originals = {name: getattr(CpuKernel, name) for name in KERNEL_CALLS}

    def timed(name, fn):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            spent[name][0] += 1
            spent[name][1] += time.perf_counter() - t0
            return out
        return call

    try:
        for name, fn in originals.items():
            setattr(CpuKernel, name, timed(name, fn))
        for _ in range(steps):
            engine.step()
    finally:
        for name, fn in originals.items():
            setattr(CpuKernel, name, fn)
    return {name: (calls, secs) for name, (calls, secs) in spent.items() if calls}


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
        start_decoding(engine, tmp, args.batch, args.adapters, args.steps * 4 + 64)
        for _ in range(3):
            engine.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - t0) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                engine.step()
        kernels = kernel_times(engine, args.steps)
        nbytes = step_bytes(engine)
    gbs = read_gb_s()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    for name, (calls, secs) in kernels.items():
        print(f"kernel {name}: {secs / args.steps * 1e3:.2f} ms per step, {calls // args.steps} calls "
              f"of {secs / calls * 1e6:.0f} us")
    print(f"batch {args.batch}, adapters {args.adapters}: {wall * 1e3:.1f} ms per decode step "
          f"(unprofiled), {torch.get_num_threads()} threads")
    floor = nbytes / (gbs * 1e9)
    print(f"byte floor: {nbytes / 1e6:.1f} MB of weights at {gbs:.1f} GB/s streaming read = "
          f"{floor * 1e3:.1f} ms; this step is {wall / floor:.1f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
