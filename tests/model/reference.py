"""Shared checks: our paged forward against transformers' forward on the same weights."""
from __future__ import annotations

import torch

from bench.fixtures import PagedSequences, random_prompts, randomize_  # noqa: F401  (re-exported)


def reference_last_logits(ref: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' logits (vocab,) float32 for the last token of `tokens`, no cache."""
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0, -1].float()


def run_schedule(model, ref, prompts: list[list[int]], split: int, decode_steps: int,
                 block_size: int = 4) -> float:
    """Max |ours - reference| over every logits row of a schedule that exercises the cache:

    step 1: full prefill of every prompt except prompt 1, of which only `split` tokens;
    step 2: one decode token for the others + the rest of prompt 1 (a continuation chunk
            attending to its cached prefix) in the same batch;
    then `decode_steps` decode steps for all, with greedy tokens.
    Blocks are small and shuffled so sequences span several non-contiguous blocks.
    """
    n_blocks = sum(len(p) + decode_steps + 2 for p in prompts) // block_size + 4 * len(prompts)
    model.allocate_kv_cache(n_blocks, block_size)
    pages = PagedSequences(n_blocks, block_size, seed=1)
    seqs = [list(p) for p in prompts]
    seqs[1] = prompts[1][:split]
    worst = 0.0

    def check(logits: torch.Tensor, order: list[int]) -> list[int]:
        nonlocal worst
        assert logits.shape == (len(order), model.arch.vocab_size) and logits.dtype == torch.float32
        for row, i in enumerate(order):
            worst = max(worst, (logits[row] - reference_last_logits(ref, seqs[i])).abs().max().item())
        return logits.argmax(-1).tolist()

    order = list(range(len(prompts)))
    nxt = check(model(pages.step({i: seqs[i] for i in order})), order)
    step2 = {i: [nxt[i]] for i in order if i != 1}
    step2[1] = prompts[1][split:]
    for i in order:
        seqs[i] = seqs[i] + step2[i] if i != 1 else list(prompts[1])
    order2 = list(step2)
    tok2 = check(model(pages.step(step2)), order2)
    nxt = dict(zip(order2, tok2))
    for _ in range(decode_steps):
        for i in order:
            seqs[i].append(nxt[i])
        toks = check(model(pages.step({i: [nxt[i]] for i in order})), order)
        nxt = dict(zip(order, toks))
    return worst


def bnb_exact(model: torch.nn.Module) -> None:
    """Put a transformers + bitsandbytes NF4 model on bitsandbytes' exact CPU path (float32
    dequantize + matmul), before its first forward: its fused CPU kernel computes in bf16."""
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False), "already repacked"
            m.support_avx512bf16_for_cpu = False
