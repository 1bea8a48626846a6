"""LoRA shrink / expand: the torch reference (CPU, and the oracle in tests) and the backend choice.

For token row i with slot s = token_slots[i] (>= 0) and that adapter's rank r:

    h[i, :r]  = x[i] @ a_stack[s, :r].T          # x: (T, d_in), a_stack: (S, r_max, d_in) -> h: (T, r_max)
    y[i]     += h[i, :r] @ b_stack[s, :, :r].T   # b_stack: (S, d_out, r_max) -> y: (T, d_out)

Rows with slot -1 skip the LoRA path (y unchanged, h zero). The reference groups rows by
slot (at most max_loras groups, whatever the number of segments) and slices each group to
its adapter's actual rank rather than padding every row to r_max. Padding matters: for
rank-4 adapters in a 576 -> 1536 linear (bench/cpu_lora_padding.py, 2-core CPU, noisy)
padding to r_max costs x1.1-1.6 at r_max 16, x2-4 at 64 and x6-10 at 256, while the sliced
path stays flat; padded blocks (see LoraPlan) hold slots of one exact rank for the same
reason. The Triton kernels mask the rank the same way.

On CPU, decode with many distinct adapters is bound by memory bandwidth: every row reads
its adapter's A and B in every linear, 20 MB per r=16 adapter on SmolLM2-135M (fp32, all
seven modules), so 32 distinct adapters stream 625 MB per step (312 MB from bf16 slots,
EngineConfig.lora_dtype). The torch bmm pairs run at about 9-12 GB/s on one core here; the
C rows at 24-30 GB/s (float32) and 15-20 GB/s (bf16) on two. Batch 32, 32 distinct adapters,
decode steps interleaved with the base's (2-core Zen 4): base 67.9 ms, float32 slots 91.4
(0.74 of base), bf16 slots 79.5 (0.85).

On a CPU with the project's kernels (server/cpu_kernel.py) the float32 backend runs every
row in C on the process's threads, each row reading its own adapter's A and B (from cache
when rows share an adapter): one call per linear, whatever the mix of decode and prefill
rows. Nothing sets torch's thread count per call: the torch reference runs on the process's
threads too, and stays the fallback (no C compiler, other dtypes) and the oracle in tests.

The backend (torch, CPU kernel or Triton) is chosen once at start-up by `select_backend`,
never per call; the torch reference is the oracle in tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from server.lora.mapping import LoraBatch


@dataclass(frozen=True)
class LoraOps:
    name: str
    shrink: Callable[[torch.Tensor, torch.Tensor, LoraBatch], torch.Tensor]
    expand: Callable[[torch.Tensor, torch.Tensor, LoraBatch, torch.Tensor], torch.Tensor]
    # y += expand(shrink(x)): what a LoRA linear calls; a backend may fuse the two
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LoraBatch, torch.Tensor], torch.Tensor]


def shrink(x: torch.Tensor, a_stack: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
    """h = per-row x @ A[slot, :rank].T; zeros elsewhere.  x: (T, d_in) -> (T, r_max)."""
    h = x.new_zeros(x.shape[0], a_stack.shape[1])  # (T, r_max)
    for slot, rank, rows in lora.slot_groups():
        h[rows, :rank] = x[rows] @ a_stack[slot, :rank].T  # (n, d_in) @ (d_in, rank) -> (n, rank)
    return h


def expand(h: torch.Tensor, b_stack: torch.Tensor, lora: LoraBatch, y: torch.Tensor) -> torch.Tensor:
    """y[rows] += h[rows, :rank] @ B[slot, :, :rank].T per slot group, in place.  -> y (T, d_out)."""
    h = h.to(y.dtype)
    for slot, rank, rows in lora.slot_groups():
        delta = h[rows, :rank] @ b_stack[slot, :, :rank].T  # (n, rank) @ (rank, d_out) -> (n, d_out)
        if isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta)
    return y


def apply(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, lora: LoraBatch,
          y: torch.Tensor) -> torch.Tensor:
    """expand(shrink(x)) as the step's LoraPlan says: small groups (decode rows) in padded
    blocks, one bmm pair per block over a run of slots; big groups (prefill) one matmul pair
    each, sliced to their rank (h never materialised for the whole batch)."""
    plan = lora.plan()
    d_in, d_out = x.shape[1], y.shape[1]
    for blk in plan.blocks:
        n_slots = blk.hi - blk.lo
        if blk.src is not None:
            xp = x.index_select(0, blk.src)                      # (S * W, d_in), every position a row
        else:
            xp = x.new_zeros(n_slots * blk.width, d_in)          # (S * W, d_in), zero where no row
            xp.index_copy_(0, blk.dest, x if blk.rows is None else x.index_select(0, blk.rows))
        h = torch.bmm(xp.view(n_slots, blk.width, d_in),
                      a_stack[blk.lo:blk.hi, :blk.rank].transpose(1, 2))    # (S, W, rank)
        d = torch.bmm(h, b_stack[blk.lo:blk.hi, :, :blk.rank].transpose(1, 2))  # (S, W, d_out)
        d = d.view(n_slots * blk.width, d_out).to(y.dtype)                  # (S * W, d_out)
        if blk.src is not None:
            y.index_add_(0, blk.src, d)
        elif blk.rows is None:
            y += d.index_select(0, blk.dest)
        else:
            y.index_add_(0, blk.rows, d.index_select(0, blk.dest))
    return _apply_groups(x, a_stack, b_stack, plan.groups, y)


def _apply_groups(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                  groups: list[tuple[int, int, slice | torch.Tensor]], y: torch.Tensor) -> torch.Tensor:
    """The big groups (prefill rows of one slot): one matmul pair each, sliced to the rank."""
    for slot, rank, rows in groups:
        delta = (x[rows] @ a_stack[slot, :rank].T) @ b_stack[slot, :, :rank].T  # (n, rank) -> (n, d_out)
        if isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta)
    return y


def apply_cpu_kernel(kernel, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, lora: LoraBatch,
                     y: torch.Tensor) -> torch.Tensor:
    """expand(shrink(x)) on the CPU kernel for every row with an adapter, each row reading its
    own adapter's A and B, rows split across the process's threads; shapes the kernel cannot
    take go to `apply`."""
    bt = b_stack.transpose(1, 2)  # (S, r_max, d_out), contiguous in the slots' layout
    fits = (x.shape[1] % 16 == 0 and y.shape[1] % 16 == 0 and a_stack.is_contiguous() and bt.is_contiguous()
            and x.stride(1) == 1 and y.stride(1) == 1 and x.dtype == y.dtype == torch.float32
            and a_stack.dtype in (torch.float32, torch.bfloat16))
    if not fits:  # float32 slots only: bf16 ones are chosen where every linear fits (loader._lora_storage)
        return apply(x, a_stack, b_stack, lora, y)
    return kernel.lora_rows(x, a_stack, bt, lora.token_slots, lora.row_ranks(), y)  # (T, d_out) in place


def _unfused(shrink_fn, expand_fn):
    def apply_fn(x, a_stack, b_stack, lora, y):
        return expand_fn(shrink_fn(x, a_stack, lora), b_stack, lora, y)
    return apply_fn


TORCH_OPS = LoraOps("torch", shrink, expand, apply)


def select_backend(device: torch.device | str, dtype: torch.dtype = torch.float32) -> LoraOps:
    """Triton kernels on CUDA (when triton imports); on a CPU, the C kernel for decode rows
    (float32, where it builds: server/cpu_kernel.py) or the torch reference; once at start-up."""
    if torch.device(device).type == "cuda":
        try:
            from server.lora import triton_ops
        except ImportError:
            return TORCH_OPS
        return LoraOps("triton", triton_ops.shrink, triton_ops.expand,
                       _unfused(triton_ops.shrink, triton_ops.expand))
    if dtype == torch.float32:
        from server.cpu_kernel import KernelUnavailable, load
        try:
            kernel = load()
        except KernelUnavailable:
            return TORCH_OPS
        return LoraOps("cpu-kernel", shrink, expand, partial(apply_cpu_kernel, kernel))
    return TORCH_OPS
