"""Mixed-adapter batches through our model + AdapterStore against transformers + PEFT.

One batch holds a base-only row and rows for adapters of rank 4, 8, 16 and 64 with different
lora_alpha, one use_rslora, one rank_pattern/alpha_pattern and one targeting only q/v (one
adapter twice, in rows that are not neighbours). Each row's logits must equal those of
transformers + PeftModel (unmerged, that adapter alone) on the same base weights, over a
prefill step and two decode steps through the paged KV cache.

The exact path (lora_dtype float32) is what these tests hold to PEFT. The default for NF4 on
the CPU kernels keeps A and B in bfloat16 (EngineConfig.lora_dtype): that path must equal
PEFT on the same adapters rounded to bfloat16, to the same bound, and its distance from PEFT
on the float32 adapters is measured against what the adapters change.

Tolerances. quantization none: both sides run float32 on identical weights and differ only
in summation order (~1e-5 here): bound 1e-3.
NF4: both sides quantize the same float32 tensors with bitsandbytes (byte-identical codes,
see tests/model/test_quant.py). The reference runs bitsandbytes' exact float32 dequantize +
matmul (its fused CPU kernel rounds to bf16 and is switched off); ours runs its serving
path, the CPU NF4 kernel (AVX-512 or AVX2 in float32; AMX in bf16x3, within 3 * 2^-16 per product). The LoRA path is float32 on
both sides, so the same 1e-3 bound holds, and the base-only row must match too. In addition, each NF4 LoRA linear fed
one input must add what PEFT's bnb LoRA layer adds, to 1e-5. Every adapter must move its
row's logits by over 5x the bound, or the comparison would prove nothing.
"""
from __future__ import annotations

import time

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM as HFLlama

from server.config import EngineConfig
from server.lora.mapping import LoraBatch
from server.lora.store import AdapterStore
from server.model.loader import load_model
from tests.lora.helpers import save_peft_adapter, tiny_llama, tiny_llama_config
from tests.model.paged import PagedSequences
from tests.model.reference import bnb_exact, random_prompts, randomize_

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "r4": dict(r=4, lora_alpha=8, target_modules=ALL),
    "r8": dict(r=8, lora_alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    "r16-rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=("q_proj", "gate_proj", "up_proj", "down_proj")),
    "r64": dict(r=64, lora_alpha=16, target_modules=ALL),
    "pattern": dict(r=8, lora_alpha=32, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"),
                    rank_pattern={"q_proj": 2, "down_proj": 16}, alpha_pattern={"v_proj": 8}),
    "qv": dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")),
}
ROWS = [None, "r4", "r8", "r16-rslora", "r64", "pattern", "qv", "r4"]
LENGTHS = [5, 9, 3, 7, 6, 4, 8, 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    torch.manual_seed(0)
    base = HFLlama(tiny_llama_config()).eval()
    randomize_(base, 0)
    base.save_pretrained(str(root / "base"))
    maker = tiny_llama(seed=1)
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        save_peft_adapter(maker, str(root / "adapters" / name), seed=10 + i, **kw)
    return root


def _ours(model_dir, adapters_dir, quantization, names, lora_dtype="float32"):
    cfg = EngineConfig(model=str(model_dir), quantization=quantization, adapters_dir=str(adapters_dir),
                       lm_head_dtype="float32", lora_dtype=lora_dtype,
                       max_loras=8, max_cpu_loras=8, max_lora_rank=64)
    model = load_model(cfg, "cpu", torch.float32)
    store = AdapterStore(cfg, model.lora_linears(), "cpu", torch.float32)
    end = time.monotonic() + 60
    for name in names:
        while not store.request_resident(name):
            assert time.monotonic() < end
            store.poll()
            time.sleep(0.005)
    return model, store


def _run_ours(model, store, prompts, rows, decode_steps=2):
    """[(logits (B, V), token lists)] per step of a mixed batch: prefill all, then decode steps."""
    model.allocate_kv_cache(64, 4)
    pages = PagedSequences(64, 4, seed=2)
    seqs = [list(p) for p in prompts]
    slot = {n: store.slot_and_rank(n) for n in rows if n is not None}
    out = []
    new = {i: p for i, p in enumerate(prompts)}
    for _ in range(decode_steps + 1):
        batch = pages.step(new)
        row_slots, row_ranks = [], []
        for i, toks in new.items():
            s, r = slot[rows[i]] if rows[i] else (-1, 0)
            row_slots += [s] * len(toks)
            row_ranks += [r] * len(toks)
        batch.lora = LoraBatch.from_row_slots(row_slots, row_ranks, "cpu")
        logits = model(batch)  # (B, V)
        out.append((logits, [list(s) for s in seqs]))
        nxt = logits.argmax(-1).tolist()
        for i in range(len(seqs)):
            seqs[i].append(nxt[i])
        new = {i: [nxt[i]] for i in range(len(seqs))}
    return out


def _peft_logits(ref, adapters_dir, name, token_lists):
    """transformers (+ PeftModel with adapter `name` alone, unmerged) last-token logits (N, V)."""
    from peft import PeftModel
    with torch.no_grad():
        if name is None:
            return torch.stack([ref(torch.tensor([t])).logits[0, -1].float() for t in token_lists])
        pm = PeftModel.from_pretrained(ref, str(adapters_dir / name)).eval()
        try:
            return torch.stack([pm(torch.tensor([t])).logits[0, -1].float() for t in token_lists])
        finally:
            pm.unload()


def _check(model_dir, adapters_dir, quantization, ref, rows, lengths, vocab, tol, base_tol, lora_dtype="float32",
           ref_adapters_dir=None):
    """ref_adapters_dir: the adapters PEFT loads (default: the same as ours)."""
    names = sorted({n for n in rows if n is not None})
    model, store = _ours(model_dir, adapters_dir, quantization, names, lora_dtype)
    adapters_dir = ref_adapters_dir or adapters_dir
    prompts = random_prompts(lengths, vocab, seed=3)
    steps = _run_ours(model, store, prompts, rows)
    tokens = [seqs[i] for _, seqs in steps for i in range(len(rows))]
    ours = torch.cat([logits for logits, _ in steps])   # (steps * B, V)
    row_names = rows * len(steps)
    base = _peft_logits(ref, adapters_dir, None, tokens)  # (steps * B, V)
    worst, worst_base, min_effect = 0.0, 0.0, float("inf")
    for name in [None] + names:
        sel = [k for k, n in enumerate(row_names) if n == name]
        want = base[sel] if name is None else _peft_logits(ref, adapters_dir, name, [tokens[k] for k in sel])
        err = (ours[sel] - want).abs().max().item()
        if name is None:
            worst_base = err
        else:
            worst = max(worst, err)
            min_effect = min(min_effect, (want - base[sel]).abs().amax(dim=-1).min().item())
    store.close()
    assert worst_base <= base_tol, f"base-only row: max |ours - transformers| = {worst_base}"
    assert worst <= tol, f"max |ours - PEFT| = {worst}"
    assert min_effect > 5 * tol, f"an adapter moves logits by only {min_effect}: the test would prove nothing"
    return model, store


def test_mixed_batch_matches_peft_dense(setup):
    ref = HFLlama.from_pretrained(str(setup / "base"), dtype=torch.float32).eval()
    _check(setup / "base", setup / "adapters", "none", ref, ROWS, LENGTHS, 128, 1e-3, 1e-3)


def test_mixed_batch_matches_peft_nf4(setup):
    from peft import PeftModel
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    ref = HFLlama.from_pretrained(str(setup / "base"), quantization_config=bnb, dtype=torch.float32,
                                  device_map="cpu").eval()
    bnb_exact(ref)
    model, store = _check(setup / "base", setup / "adapters", "nf4", ref, ROWS, LENGTHS, 128, 1e-3, 1e-3)
    # (b) layer by layer: the same input through our NF4 LoRA linear and PEFT's bnb LoRA layer
    slot, rank = store.slot_and_rank("r4")
    pm = PeftModel.from_pretrained(ref, str(setup / "adapters" / "r4")).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, layer in model.lora_linears().items():
            x = torch.randn(6, layer.in_features, generator=g)
            lora = LoraBatch.from_row_slots([slot] * 6, [rank] * 6, "cpu")
            peft_layer = pm.base_model.model.get_submodule(name)
            want = peft_layer(x) - peft_layer.base_layer(x)   # PEFT's LoRA contribution
            got = layer(x, lora) - layer(x, None)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert want.abs().max() > 1e-1
    pm.unload()


DEFAULT_ADAPTERS = {
    "d-r4": dict(r=4, lora_alpha=8, target_modules=ALL),
    "d-qv": dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")),
    "d-r16-rslora": dict(r=16, lora_alpha=4, use_rslora=True, target_modules=ALL),
    "d-r64-pattern": dict(r=64, lora_alpha=16, target_modules=("q_proj", "k_proj", "o_proj", "down_proj"),
                          rank_pattern={"k_proj": 8}, alpha_pattern={"down_proj": 4}),
}


@pytest.mark.slow
def test_default_model_mixed_batch_matches_peft(tmp_path):
    from transformers import AutoModelForCausalLM

    from server.model.default import ensure_default_model
    folder = ensure_default_model()
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for i, (name, kw) in enumerate(DEFAULT_ADAPTERS.items()):
        save_peft_adapter(ref, str(tmp_path / name), seed=20 + i, **kw)
    rows = [None, "d-r4", "d-qv", "d-r16-rslora", "d-r64-pattern", "d-qv"]
    _check(folder, tmp_path, "none", ref, rows, [6, 5, 8, 4, 7, 3], ref.config.vocab_size, 1e-3, 1e-3)


def _bf16_copies(src, dst, names):
    """Each adapter with its tensors rounded to bfloat16 and back (float32 files)."""
    import shutil

    from safetensors.torch import load_file, save_file
    for name in names:
        shutil.copytree(src / name, dst / name)
        path = dst / name / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(str(path)).items()}, str(path))
    return dst


def test_bf16_slots_equal_peft_on_bf16_rounded_adapters_nf4(setup, tmp_path):
    """The bfloat16 slots compute exactly the bf16-rounded adapters (every scale here is a
    power of two, so rounding B' = scale * B equals scaling the rounded B): the exact path's
    1e-3 bound against PEFT on rounded copies."""
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    ref = HFLlama.from_pretrained(str(setup / "base"), quantization_config=bnb, dtype=torch.float32,
                                  device_map="cpu").eval()
    bnb_exact(ref)
    rounded = _bf16_copies(setup / "adapters", tmp_path, ADAPTERS)
    model, store = _check(setup / "base", setup / "adapters", "nf4", ref, ROWS, LENGTHS, 128, 1e-3, 1e-3,
                          lora_dtype="bfloat16", ref_adapters_dir=rounded)
    assert all(m.slots.a.dtype == torch.bfloat16 for m in model.lora_linears().values())


def test_bf16_slots_move_logits_by_a_small_part_of_what_the_adapters_do(setup):
    """Against PEFT on the float32 adapters: rounding A and B to bf16 (relative 2^-9 each)
    moves each row's logits by at most 2^-5 of what its adapter changes them by (measured
    1.2e-2 here; on the default model with two r=16 adapters, at most 0.08 of a logit over
    four steps, greedy tokens unchanged), never near the change itself."""
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    ref = HFLlama.from_pretrained(str(setup / "base"), quantization_config=bnb, dtype=torch.float32,
                                  device_map="cpu").eval()
    bnb_exact(ref)
    names = sorted(ADAPTERS)
    model, store = _ours(setup / "base", setup / "adapters", "nf4", names, "bfloat16")
    prompts = random_prompts(LENGTHS, 128, seed=3)
    steps = _run_ours(model, store, prompts, ROWS)
    store.close()
    tokens = [seqs[i] for _, seqs in steps for i in range(len(ROWS))]
    ours = torch.cat([logits for logits, _ in steps])
    row_names = ROWS * len(steps)
    base = _peft_logits(ref, setup / "adapters", None, tokens)
    worst = 0.0
    for name in names:
        sel = [k for k, n in enumerate(row_names) if n == name]
        want = _peft_logits(ref, setup / "adapters", name, [tokens[k] for k in sel])
        effect = (want - base[sel]).abs().amax(dim=-1)   # (rows,) what the adapter changes
        err = (ours[sel] - want).abs().amax(dim=-1)
        worst = max(worst, (err / effect).max().item())
    assert worst <= 2 ** -5, f"bf16 slots moved logits by {worst:.2e} of the adapters' own change"
    assert worst > 0  # the slots really are bf16: rounding moved something
