"""The compiled decode step (server/model/compiled.py) on the CPU, against the eager step.

The eager step is the oracle here: it is itself held to transformers, PEFT and the float32
paths by tests/model, tests/lora and the golden replay. The compiled step runs the same
ops in float32; what Inductor may change is the order of a reduction (RMSNorm's mean of
576 squares) and where a product is rounded inside a fused loop. Each such change moves a
value by a few float32 ulps (~1e-7 relative); over 30 layers that grows to ~1e-5 of the
logits' scale. The tolerance asserted, 1e-4 of the largest logit, is ten times that, and
a thousand times below the gaps that decide greedy tokens on these prompts (the golden
runs' closest call is 0.008 in logprob), which is why the greedy texts must be identical.

The fixture puts the step on the "fail_on_recompile" stance: any step whose shapes the
start-up warm-up did not compile for raises, so every test here also checks that the two
warmed graphs serve batches of 1, 3 and 5 sequences, contexts of one block and of three,
with and without adapter rows.
"""
from __future__ import annotations

import pytest
import torch

from server.config import ConfigError, EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.model import compiled
from server.model.compiled import CompiledDecode
from tests.engine import golden


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    cfg = golden.config(str(root), "auto")
    eng = Engine(EngineConfig(**{**cfg.__dict__, "compile": "on"}))
    golden.write_adapters(root, eng)
    step = eng.model.decode_step
    assert isinstance(step, CompiledDecode) and step.warm and step.compile_seconds > 0
    step.stance = "fail_on_recompile"
    return eng


def _run(eng: Engine, prompts: list[tuple[list[int], str | None, int]]) -> list[list[int]]:
    reqs = [Request(ids, SamplingParams(max_tokens=n, temperature=0.0), adapter=adapter)
            for ids, adapter, n in prompts]
    for r in reqs:
        eng.add_request(r)
    while eng.has_unfinished():
        eng.step()
    return [r.output_ids for r in reqs]


def test_compiled_logits_equal_the_eager_step(engine, monkeypatch):
    """Every decode step of a mixed batch (base and three adapters; 5, then 3, then 1
    sequences) computed both ways on the same batch: the compiled logits are the eager ones
    to 1e-4 of their scale, and the batch follows the compiled ones."""
    model = engine.model
    forward = model.forward
    seen: list[tuple[int, bool, float]] = []

    def both(batch):
        if not batch.is_decode_only:
            return forward(batch)
        step = model.decode_step
        model.decode_step = None
        eager = forward(batch)  # (B, vocab)
        model.decode_step = step
        ours = forward(batch)   # (B, vocab); rewrites the same K/V slots
        rel = ((ours - eager).abs().max() / eager.abs().max()).item()
        seen.append((batch.num_seqs, batch.lora is not None, rel))
        return ours

    monkeypatch.setattr(model, "forward", both)
    tok = engine.tokenizer
    chat = [tok.encode_chat([{"role": "user", "content": p}]) for p in golden.PROMPTS[:5]]
    _run(engine, [(chat[0], None, 6), (chat[1], "gold-a", 12), (chat[2], "gold-b", 20),
                  (chat[3], None, 12), (chat[4], "gold-c", 6)])
    sizes = {b for b, _, _ in seen}
    assert {5, 3, 1} <= sizes and {True} == {lora for b, lora, _ in seen if b > 1}
    worst = max(rel for _, _, rel in seen)
    assert worst < 1e-4, seen
    assert worst > 0 or all(rel == 0 for _, _, rel in seen)  # a measured difference, not a skipped one


def test_greedy_text_compiled_equals_eager_on_the_golden_prompts(engine):
    """The 8 golden runs (one request at a time: batches of one; base, adapters, a JSON
    schema) give identical tokens on the compiled step and on the eager one."""
    step = engine.model.decode_step
    runs = golden.generate_all(engine)
    engine.model.decode_step = None
    try:
        eager = golden.generate_all(engine)
    finally:
        engine.model.decode_step = step
    assert [r["token_ids"] for r in runs] == [r["token_ids"] for r in eager]
    assert all(len(r["token_ids"]) > 0 for r in runs)


def test_a_context_in_one_block_and_a_lone_adapter_row(engine):
    """A raw two-token prompt decodes from one KV block into the second (block table width 1,
    then 2) alone and beside an adapter row, with no new graph; same tokens as eager."""
    ids = engine.tokenizer.encode("Hi")
    assert len(ids) < engine.config.block_size
    prompts = [(ids, None, 24), (ids, "gold-b", 24)]
    ours = _run(engine, prompts[:1]) + _run(engine, prompts[1:]) + _run(engine, prompts)
    step = engine.model.decode_step
    engine.model.decode_step = None
    try:
        eager = _run(engine, prompts[:1]) + _run(engine, prompts[1:]) + _run(engine, prompts)
    finally:
        engine.model.decode_step = step
    assert ours == eager and all(len(o) == 24 for o in ours)
    assert ours[0] != ours[1]  # the adapter row really took its adapter


def test_a_failed_compile_keeps_the_eager_step_and_says_why(engine, monkeypatch):
    model = engine.model
    step = model.decode_step

    def fail(self, scratch_block):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(CompiledDecode, "warm_up", fail)
    try:
        said = compiled.enable(model, 0)
        assert model.decode_step is None
        assert "eager decode step" in said and "no C++ compiler found" in said
    finally:
        model.decode_step = step


def test_compile_config():
    with pytest.raises(ConfigError, match="compile"):
        EngineConfig(compile="yes")
    assert not EngineConfig(compile="auto", device="cpu").compiles()
    assert EngineConfig(compile="on", device="cpu").compiles()
    assert not EngineConfig(compile="off", device="cpu").compiles()
    from server.cli import build_parser, engine_config
    args = build_parser().parse_args(["bench", "--compile", "on"])
    assert engine_config(args).compile == "on"


def test_the_kernel_ops_are_the_kernels(engine):
    """Called through torch's dispatcher (as the compiled graph calls them), the ops return
    what the kernels return eagerly."""
    from server.cpu_kernel import load
    kernel = load()
    lin = engine.model.model.layers[0].mlp.down_proj.base
    x = torch.randn(5, lin.in_features)
    direct = kernel.nf4_matmul(x, lin.weight, lin.quant_state.absmax, lin.code_book, lin.out_features, None)
    via_op = torch.ops.loraplex.nf4_matmul(x, lin.weight, lin.quant_state.absmax, lin.code_book,
                                           lin.out_features, None)
    assert torch.equal(direct, via_op)
    w = engine.model.lm_head_bf16
    assert torch.equal(kernel.bf16_matmul(x[:, :w.shape[1]].contiguous(), w),
                       torch.ops.loraplex.bf16_matmul(x[:, :w.shape[1]].contiguous(), w))
    norm = engine.model.model.norm
    h = torch.randn(3, norm.weight.shape[0])
    assert torch.equal(kernel.rms_norm(h, norm.weight, norm.eps), torch.ops.loraplex.rms_norm(h, norm.weight, norm.eps))
    gate, up = torch.randn(4, 40), torch.randn(4, 40)
    assert torch.equal(kernel.silu_mul(gate, up), torch.ops.loraplex.silu_mul(gate, up))
    attn = engine.model.model.layers[0].self_attn
    hd, hkv = attn.head_dim, attn.num_kv_heads
    q, k, v = torch.randn(2, attn.num_heads * hd), torch.randn(2, hkv * hd), torch.randn(2, hkv * hd)
    cos, sin = torch.randn(2, hd), torch.randn(2, hd)
    slots = torch.tensor([0, 1])
    caches = [torch.zeros(1, 2, hkv, hd) for _ in range(4)]
    direct = kernel.rope_cache(q, k, v, cos, sin, slots, caches[0], caches[1])
    via_op = torch.ops.loraplex.rope_cache(q, k, v, cos, sin, slots, caches[2], caches[3])
    assert all(torch.equal(a, b) for a, b in zip(direct, via_op))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]) and caches[0].abs().sum() > 0
