"""Token bitmasks: fill them for a batch of matchers, apply them to logits.

Layout (llguidance's): row i, word w, bit b (LSB first) allows token 32*w + b.

apply_bitmask uses plain tensor ops: each mask byte indexes a (256, 8) table of additive
biases (0 or -inf), and the gathered row is added to the logits. Measured on the 2-core
CPU (V = 49152, `python bench/structured.py --compiled-apply`): p50 33 us at
batch 1 and 290 us at batch 8, against 40 us / 159 us for llguidance.torch's
apply_token_bitmask_inplace once warm; but that one goes through torch.compile (first
call 15 s cold, 2.7 s with inductor's disk cache, another compile per new batch shape)
and needs a C++ compiler at run time. Unpacking bits with shifts and masked_fill/where
took 240-450 us at batch 1: bool-masked writes are not vectorised on this CPU.
"""
from __future__ import annotations

import sys
import threading

import llguidance
import llguidance.torch
import torch

assert sys.byteorder == "little", "apply_bitmask reads int32 mask words as little-endian bytes"

_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
_bias_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _get_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def fill_bitmasks(matchers: list) -> torch.Tensor:
    """Allowed next tokens of each matcher, computed in parallel by llguidance.

    Returns int32 (n, ceil(V/32)) on the CPU, V = the matchers' tokenizer vocabulary;
    row i belongs to matchers[i]. An empty list gives a (0, 0) tensor.
    Semantics (reference):
        out[i, w] bit b == 1  <=>  token 32*w + b is in matchers[i].allowed_token_ids()
    """
    if not matchers:
        return torch.empty((0, 0), dtype=torch.int32)
    vocab = matchers[0].vocab_size
    assert all(m.vocab_size == vocab for m in matchers), "matchers from different tokenizers"
    bitmask = torch.empty(llguidance.torch.get_bitmask_shape(len(matchers), vocab),
                          dtype=torch.int32)                        # (n, W)
    llguidance.torch.fill_next_token_bitmask_par(
        _get_executor(), [(m.llmatcher, i) for i, m in enumerate(matchers)], bitmask)
    return bitmask


def _bias_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    table = _bias_tables.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1    # (256, 8)
        table = torch.zeros((256, 8), dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)
        _bias_tables[key] = table
    return table


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set refused tokens' logits to -inf, in place.

    logits: (n, V) float on any device; bitmask: int32 (n, W) from fill_bitmasks.
    Tokens past 32*W (a model vocabulary padded beyond the tokenizer's) are refused;
    mask bits past V are ignored.
    Semantics (reference):
        for i, t: if not (bitmask[i, t // 32] >> (t % 32)) & 1: logits[i, t] = -inf
    """
    n, vocab = logits.shape
    assert bitmask.dtype == torch.int32 and bitmask.dim() == 2 and bitmask.shape[0] == n, \
        f"bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not fit logits {tuple(logits.shape)}"
    covered = min(vocab, 32 * bitmask.shape[1])
    if covered < vocab:
        logits[:, covered:] = float("-inf")
    # little-endian int32 -> bytes keeps token order: byte k of row i covers tokens 8k..8k+7
    mask_bytes = bitmask.to(logits.device, non_blocking=True).contiguous().view(torch.uint8)  # (n, 4W)
    bias = _bias_table(logits.device, logits.dtype).index_select(0, mask_bytes.reshape(-1).long())
    logits[:, :covered].add_(bias.view(n, -1)[:, :covered])                                  # (n, covered)
