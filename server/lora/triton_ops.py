"""SGMV / BGMV-style Triton kernels for LoRA shrink and expand (CUDA; TRITON_INTERPRET=1 on CPU).

BGMV (decode): one row per sequence, each row reads its own slot.
SGMV (prefill): segments of consecutive rows share a slot, so A/B tiles are reused
across the rows of a segment (tl.dot on BLOCK_M rows at once).
Every kernel masks the rank dimension to the adapter's actual rank, so padded columns of
a slot are never read. Shrink accumulates in fp32 and returns h in fp32; expand adds in
fp32 and stores in y's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.lora.mapping import LoraBatch, SegmentTables

SGMV_MIN_MEAN_SEG = 4   # segments shorter than this on average go through the BGMV kernels
_TARGET_PROGRAMS = 256  # split-K until about this many programs are in flight


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, out_ptr, slots_ptr, ranks_ptr, d_in,
                        stride_xt, stride_as, stride_ar, stride_ot,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    row = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    rank = tl.load(ranks_ptr + row)
    if slot >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, d_in, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < d_in
            x = tl.load(x_ptr + row * stride_xt + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # (R, K)
            acc += tl.sum(a * x[None, :], axis=1)  # (R,)
        out = out_ptr + row * stride_ot + offs_r
        if SPLIT_K == 1:
            tl.store(out, acc, mask=r_mask)
        else:
            tl.atomic_add(out, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(h_ptr, b_ptr, y_ptr, slots_ptr, ranks_ptr, d_out,
                        stride_ht, stride_bs, stride_bn, stride_br, stride_yt,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    rank = tl.load(ranks_ptr + row)
    if slot >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < d_out
        h = tl.load(h_ptr + row * stride_ht + offs_r, mask=r_mask, other=0.0).to(tl.float32)  # (R,)
        b = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # (N, R)
        acc = tl.sum(b * h[None, :], axis=1)  # (N,)
        y_ptrs = y_ptr + row * stride_yt + offs_n
        y = tl.load(y_ptrs, mask=n_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=n_mask)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, out_ptr, starts_ptr, ends_ptr, slots_ptr, ranks_ptr, d_in,
                        stride_xt, stride_as, stride_ar, stride_ot,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(starts_ptr + seg)
    end = tl.load(ends_ptr + seg)
    m0 = start + pid_m * BLOCK_M
    if m0 < end:
        slot = tl.load(slots_ptr + seg).to(tl.int64)
        rank = tl.load(ranks_ptr + seg)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, d_in, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < d_in
            x = tl.load(x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (M, K)
            a = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None],
                        mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # (K, R)
            acc += tl.dot(x, a.to(x.dtype), input_precision=PRECISION)  # (M, R)
        out = out_ptr + offs_m[:, None] * stride_ot + offs_r[None, :]
        mask = m_mask[:, None] & r_mask[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _sgmv_expand_kernel(h_ptr, b_ptr, y_ptr, starts_ptr, ends_ptr, slots_ptr, ranks_ptr, d_out,
                        stride_ht, stride_bs, stride_bn, stride_br, stride_yt,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(starts_ptr + seg)
    end = tl.load(ends_ptr + seg)
    m0 = start + pid_m * BLOCK_M
    if m0 < end:
        slot = tl.load(slots_ptr + seg).to(tl.int64)
        rank = tl.load(ranks_ptr + seg)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < d_out
        b = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (R, N)
        h = tl.load(h_ptr + offs_m[:, None] * stride_ht + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # (M, R)
        acc = tl.dot(h.to(b.dtype), b, input_precision=PRECISION)  # (M, N)
        y_ptrs = y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 inputs would otherwise be rounded to TF32 on CUDA, which
    moved LoRA rows' logits by ~4e-2 against PEFT (measured on an H100); 16-bit inputs are exact."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_r(r_max: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(r_max))


def _split_k(programs: int, k_blocks: int) -> int:
    split = 1
    while programs * split * 2 <= _TARGET_PROGRAMS and split * 2 <= k_blocks:
        split *= 2
    return split


def bgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per-row low-rank projection.

    Semantics (reference):
        out[i, :ranks[i]] = x[i] @ a_stack[slots[i], :ranks[i]].T
        # x: (T, d_in), a_stack: (S, r_max, d_in), slots/ranks: (T,) -> out: (T, r_max) fp32
    Rows with slots[i] < 0, and columns at or past ranks[i], are zero.
    """
    T, d_in = x.shape
    r_max = a_stack.shape[1]
    assert x.stride(1) == 1 and a_stack.is_contiguous()
    out = torch.zeros(T, r_max, dtype=torch.float32, device=x.device)  # (T, r_max)
    block_k = min(256, triton.next_power_of_2(d_in))
    split = _split_k(T, triton.cdiv(d_in, block_k))
    _bgmv_shrink_kernel[(T, split)](x, a_stack, out, slots, ranks, d_in,
                                     x.stride(0), a_stack.stride(0), a_stack.stride(1), out.stride(0),
                                     BLOCK_R=_block_r(r_max, 1), BLOCK_K=block_k, SPLIT_K=split)
    return out


def _dense_slots(b_stack: torch.Tensor) -> bool:
    """(S, d_out, r_max) stored either way round inside each slot (LayerSlots keeps r major)."""
    return b_stack.stride(0) == b_stack.shape[1] * b_stack.shape[2] and 1 in (b_stack.stride(1), b_stack.stride(2))


def bgmv_expand(h: torch.Tensor, b_stack: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """Per-row low-rank expansion, added in place.

    Semantics (reference):
        y[i] += h[i, :ranks[i]] @ b_stack[slots[i], :, :ranks[i]].T
        # h: (T, r_max), b_stack: (S, d_out, r_max), y: (T, d_out)
    Rows with slots[i] < 0 are left unchanged.
    """
    T, d_out = y.shape
    r_max = b_stack.shape[2]
    assert y.stride(1) == 1 and h.stride(1) == 1 and _dense_slots(b_stack)
    block_n = min(128, triton.next_power_of_2(d_out))
    _bgmv_expand_kernel[(T, triton.cdiv(d_out, block_n))](
        h, b_stack, y, slots, ranks, d_out, h.stride(0), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), y.stride(0),
        BLOCK_R=_block_r(r_max, 1), BLOCK_N=block_n)
    return y


def sgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, seg: SegmentTables) -> torch.Tensor:
    """Segmented low-rank projection (rows of a segment share one slot).

    Semantics (reference):
        for s in range(S):
            rows = slice(seg_starts[s], seg_ends[s]); r = seg_ranks[s]
            out[rows, :r] = x[rows] @ a_stack[seg_slots[s], :r].T
        # x: (T, d_in), a_stack: (n_slots, r_max, d_in) -> out: (T, r_max) fp32
    Rows in no segment, and columns past a segment's rank, are zero.
    """
    T, d_in = x.shape
    r_max = a_stack.shape[1]
    assert x.stride(1) == 1 and a_stack.is_contiguous() and x.dtype == a_stack.dtype
    out = torch.zeros(T, r_max, dtype=torch.float32, device=x.device)  # (T, r_max)
    n_seg = seg.seg_slots.shape[0]
    if n_seg == 0:
        return out
    block_m, block_k = 16 if seg.max_seg_len <= 16 else 32, 64
    m_blocks = triton.cdiv(seg.max_seg_len, block_m)
    split = _split_k(n_seg * m_blocks, triton.cdiv(d_in, block_k))
    _sgmv_shrink_kernel[(n_seg, m_blocks, split)](
        x, a_stack, out, seg.seg_starts, seg.seg_ends, seg.seg_slots, seg.seg_ranks, d_in,
        x.stride(0), a_stack.stride(0), a_stack.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_R=_block_r(r_max, 16), BLOCK_K=block_k, SPLIT_K=split,
        PRECISION=_precision(x.dtype))
    return out


def sgmv_expand(h: torch.Tensor, b_stack: torch.Tensor, seg: SegmentTables, y: torch.Tensor) -> torch.Tensor:
    """Segmented low-rank expansion, added in place.

    Semantics (reference):
        for s in range(S):
            rows = slice(seg_starts[s], seg_ends[s]); r = seg_ranks[s]
            y[rows] += h[rows, :r] @ b_stack[seg_slots[s], :, :r].T
        # h: (T, r_max), b_stack: (n_slots, d_out, r_max), y: (T, d_out)
    """
    T, d_out = y.shape
    r_max = b_stack.shape[2]
    assert y.stride(1) == 1 and h.stride(1) == 1 and _dense_slots(b_stack)
    n_seg = seg.seg_slots.shape[0]
    if n_seg == 0:
        return y
    block_m, block_n = 16 if seg.max_seg_len <= 16 else 32, min(64, max(16, triton.next_power_of_2(d_out)))
    grid = (n_seg, triton.cdiv(seg.max_seg_len, block_m), triton.cdiv(d_out, block_n))
    _sgmv_expand_kernel[grid](
        h, b_stack, y, seg.seg_starts, seg.seg_ends, seg.seg_slots, seg.seg_ranks, d_out,
        h.stride(0), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), y.stride(0),
        BLOCK_M=block_m, BLOCK_R=_block_r(r_max, 16), BLOCK_N=block_n,
        PRECISION=_precision(b_stack.dtype))
    return y


def shrink(x: torch.Tensor, a_stack: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
    """ops.shrink on CUDA: SGMV for prefill-like batches, BGMV for decode-like.  -> (T, r_max) fp32."""
    seg = lora.tables()
    if seg.mean_seg_len >= SGMV_MIN_MEAN_SEG:
        return sgmv_shrink(x, a_stack, seg)
    return bgmv_shrink(x, a_stack, lora.token_slots, seg.token_ranks)


def expand(h: torch.Tensor, b_stack: torch.Tensor, lora: LoraBatch, y: torch.Tensor) -> torch.Tensor:
    """ops.expand on CUDA (same choice as shrink).  -> y (T, d_out), updated in place."""
    seg = lora.tables()
    if seg.mean_seg_len >= SGMV_MIN_MEAN_SEG:
        return sgmv_expand(h, b_stack, seg, y)
    return bgmv_expand(h, b_stack, lora.token_slots, seg.token_ranks, y)
