"""LoRA kernels on one GPU: Triton SGMV/BGMV against the torch reference, Llama-3-8B-shaped.

One layer with d_in = d_out = 4096, 32 adapter slots of rank 16, bf16 and fp16:
decode batches of 1 / 16 / 64 rows (BGMV, each row its own sequence and slot) and prefill
batches of 1 / 4 / 16 segments x 128 tokens (SGMV), plus a rank-4 batch held in rank-64
slots with and without rank grouping (what padding to max_lora_rank costs).
For each case: max abs error of Triton and of the torch reference against an fp32 loop on
the same weights, the time of both (triton.testing.do_bench), and the achieved GB/s for the
bytes the op must move at least (the A and B slices of the slots used, x read, y read and
written). Prints a table; writes $OUT/lora_kernels.json when OUT is set.

    python bench/gpu_lora_kernels.py            # on a CUDA GPU, under 2 minutes
    python bench/gpu_lora_kernels.py --dry-run  # tiny shapes, Triton's CPU interpreter
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    return p.parse_args(argv)


def _cases(dry: bool) -> list[dict]:
    """Shapes per case: T rows in segments of seg_len, slots drawn from n_slots."""
    d, r, slots = (64, 16, 4) if dry else (4096, 16, 32)
    plen = 8 if dry else 128
    decode = [1, 4] if dry else [1, 16, 64]
    prefill = [1, 2] if dry else [1, 4, 16]
    cases = [dict(kind="decode", segs=b, seg_len=1, d=d, r_max=r, rank=r, slots=slots) for b in decode]
    cases += [dict(kind="prefill", segs=s, seg_len=plen, d=d, r_max=r, rank=r, slots=slots) for s in prefill]
    big = decode[-1]
    for rank in (4, 64 if not dry else 16):   # rank-4 adapters in r_max=64 slots: grouped vs padded
        cases.append(dict(kind=f"r4-in-r{4 * r if not dry else r}" + ("-padded" if rank != 4 else ""),
                          segs=big, seg_len=1, d=d, r_max=4 * r if not dry else r, rank=rank, slots=slots,
                          true_rank=4))
    return cases


def _make(case: dict, dtype, device, seed: int):
    import torch

    from server.lora.mapping import LoraBatch
    g = torch.Generator().manual_seed(seed)
    S, R, d = case["slots"], case["r_max"], case["d"]
    true_rank = case.get("true_rank", case["rank"])
    a = torch.zeros(S, R, d)
    b = torch.zeros(S, d, R)
    a[:, :true_rank] = torch.randn(S, true_rank, d, generator=g) / 64    # (S, r_max, d_in), zero-padded
    b[:, :, :true_rank] = torch.randn(S, d, true_rank, generator=g) / 4  # (S, d_out, r_max)
    rng = random.Random(seed)
    seq_slots = rng.sample(range(S), case["segs"]) if case["segs"] <= S else \
        [rng.randrange(S) for _ in range(case["segs"])]
    rows = [s for s in seq_slots for _ in range(case["seg_len"])]
    lora = LoraBatch.from_row_slots(rows, [case["rank"]] * len(rows), device)
    x = torch.randn(len(rows), d, generator=g)
    y = torch.randn(len(rows), d, generator=g)
    return (a.to(device, dtype), b.to(device, dtype), lora, x.to(device, dtype), y.to(device, dtype),
            len(set(seq_slots)), true_rank)


def _fp32_reference(a, b, lora, x, y):
    """fp32 per slot group (the weights as stored, in fp32): y + B·(A·x) for rows with a slot."""
    out = y.float().clone()
    for slot, _, rows in lora.slot_groups():
        out[rows] += (x[rows].float() @ a[slot].float().T) @ b[slot].float().T
    return out


def _timer(dry: bool):
    if dry:
        def cpu_time(fn) -> float:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return cpu_time
    import triton

    def gpu_time(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=40)  # ms (median)
    return gpu_time


def run(dry: bool) -> dict:
    import torch

    from server.lora import ops, triton_ops
    device = "cpu" if dry else "cuda"
    timed = _timer(dry)
    rows = []
    for dtype in (torch.bfloat16, torch.float16) if not dry else (torch.float32,):
        for i, case in enumerate(_cases(dry)):
            a, b, lora, x, y0, n_used, true_rank = _make(case, dtype, device, seed=i)
            lora.slot_groups(), lora.tables()   # per-step bookkeeping, shared by every layer
            want = _fp32_reference(a, b, lora, x, y0)

            def tri():
                return triton_ops.expand(triton_ops.shrink(x, a, lora), b, lora, y0.clone())

            def ref():
                return ops.expand(ops.shrink(x, a, lora), b, lora, y0.clone())
            got_t, got_r = tri(), ref()
            h = triton_ops.shrink(x, a, lora)
            t_tri, t_ref = timed(tri), timed(ref)
            t_copy = timed(lambda: y0.clone())    # both include one clone of y: reported, not subtracted
            t_shrink = timed(lambda: triton_ops.shrink(x, a, lora))
            t_expand = timed(lambda: triton_ops.expand(h, b, lora, y0.clone()))
            T, d, el = x.shape[0], case["d"], x.element_size()
            rank_read = case["rank"] if case["kind"].endswith("padded") else true_rank
            nbytes = n_used * 2 * rank_read * d * el + T * d * el + 2 * T * d * el
            rows.append(dict(
                dtype=str(dtype).replace("torch.", ""), case=case["kind"], T=T, segments=case["segs"],
                slots_used=n_used, r_max=case["r_max"], rank=case["rank"],
                kernel="sgmv" if lora.tables().mean_seg_len >= triton_ops.SGMV_MIN_MEAN_SEG else "bgmv",
                err_triton=(got_t.float() - want).abs().max().item(),
                err_torch=(got_r.float() - want).abs().max().item(),
                triton_vs_torch=(got_t.float() - got_r.float()).abs().max().item(),
                triton_us=t_tri * 1e3, torch_us=t_ref * 1e3, clone_us=t_copy * 1e3,
                triton_shrink_us=t_shrink * 1e3, triton_expand_us=t_expand * 1e3, bytes=nbytes,
                triton_gbps=nbytes / (t_tri * 1e-3) / 1e9, torch_gbps=nbytes / (t_ref * 1e-3) / 1e9))
    return dict(device="cpu (TRITON_INTERPRET=1)" if dry else torch.cuda.get_device_name(),
                torch=torch.__version__, triton=__import__("triton").__version__, dry_run=dry, rows=rows)


def print_table(result: dict) -> None:
    print(f"# {result['device']}  torch {result['torch']}  triton {result['triton']}")
    head = (f"{'dtype':8} {'case':16} {'T':>5} {'seg':>4} {'slots':>5} {'kern':>4} {'err_tri':>8} {'err_ref':>8} "
            f"{'tri_us':>8} {'ref_us':>8} {'shr_us':>7} {'exp_us':>7} {'MB':>6} {'tri_GB/s':>8} {'ref_GB/s':>8}")
    print(head)
    for r in result["rows"]:
        print(f"{r['dtype']:8} {r['case']:16} {r['T']:5d} {r['segments']:4d} {r['slots_used']:5d} {r['kernel']:>4} "
              f"{r['err_triton']:8.1e} {r['err_torch']:8.1e} {r['triton_us']:8.1f} {r['torch_us']:8.1f} "
              f"{r['triton_shrink_us']:7.1f} {r['triton_expand_us']:7.1f} {r['bytes'] / 1e6:6.2f} "
              f"{r['triton_gbps']:8.1f} {r['torch_gbps']:8.1f}")


def check(result: dict) -> list[str]:
    """Triton must be as accurate as the torch reference (both against fp32), within bf16 noise."""
    bad = []
    for r in result["rows"]:
        if r["err_triton"] > 2 * r["err_torch"] + 2e-2:
            bad.append(f"{r['dtype']} {r['case']} T={r['T']}: triton err {r['err_triton']:.3g} vs torch {r['err_torch']:.3g}")
    return bad


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported
    sys.path.insert(0, ROOT)
    t0 = time.perf_counter()
    result = run(args.dry_run)
    result["seconds"] = time.perf_counter() - t0
    result["failures"] = check(result)
    print_table(result)
    for f in result["failures"]:
        print("FAIL", f)
    out = os.environ.get("OUT")
    if out:
        from loadtest.record import write_atomic
        path = os.path.join(out, "lora_kernels.json")
        write_atomic(path, json.dumps(result, indent=1).encode())
        print(f"wrote {path}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
