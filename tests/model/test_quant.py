"""NF4 base weights against transformers + bitsandbytes on the same checkpoint (a small
random Llama, so that both sides quantize in seconds; the default model's NF4 path is
exercised end to end in test_llama.py), and the CPU kernel (each instruction set the CPU has) against bitsandbytes'
dequantize + a float32/float64 matmul.

Both sides quantize the same float32 tensors with bitsandbytes' quantize_4bit (blocksize
64, NF4, no double quant), so the packed codes and absmax must be byte-identical.

Logits are compared on bitsandbytes' exact path on the reference side (float32 dequantize +
matmul) against both of ours: the exact path (same maths) and the serving kernel (float32
products and sums in another order). Either way only summation-order noise remains (~1e-5
here): bound 1e-3, far below the NF4-vs-dense gap (~2 here, asserted > 0.1) that any wrong
code, block or absmax causes.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM as HFLlama

from server.config import EngineConfig
from server.model.loader import load_model
from server.cpu_kernel import MATMUL_REL_ERROR, load as load_kernel, supported_isas
from server.model.quant import DENSE_ROWS, NF4Linear, is_nf4, make_linear, nf4_codes, set_nf4_kernel
from tests.model.reference import bnb_exact, random_prompts, randomize_, reference_last_logits, run_schedule

EXACT_TOL = 1e-3


def _tiny_config() -> LlamaConfig:
    # every in_features a multiple of 64, as the NF4 kernel needs (true of real models)
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=0.1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def nf4_pair(tmp_path_factory):
    torch.manual_seed(0)
    dense = HFLlama(_tiny_config()).eval()
    randomize_(dense, 0)
    folder = tmp_path_factory.mktemp("tiny-nf4")
    dense.save_pretrained(str(folder))
    # the float32 LM head (the oracle; the bf16 head is tested in test_lm_head.py)
    ours = load_model(EngineConfig(model=str(folder), quantization="nf4", lm_head_dtype="float32"), "cpu",
                      torch.float32)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=bnb, dtype=torch.float32,
                                               device_map="cpu").eval()
    bnb_exact(ref)
    return ours, ref, dense


def test_nf4_codes_byte_identical_to_transformers(nf4_pair):
    ours, ref, dense = nf4_pair
    ref_modules = dict(ref.named_modules())
    linears = ours.lora_linears()
    assert len(linears) == 3 * 7
    for name, lin in linears.items():
        assert is_nf4(lin.base) and isinstance(lin.base, NF4Linear), name
        assert lin.base.kernel is not None, name  # load_model put it on the kernel
        codes, absmax = nf4_codes(lin.base)
        ref_codes, ref_absmax = nf4_codes(ref_modules[name])
        assert codes.dtype == torch.uint8 and codes.numel() == lin.in_features * lin.out_features // 2
        assert absmax.numel() == lin.in_features * lin.out_features // 64
        assert torch.equal(codes, ref_codes), name
        assert torch.equal(absmax, ref_absmax), name
        qs = lin.base.quant_state
        assert qs.blocksize == 64 and qs.quant_type == "nf4" and not qs.nested


def test_nf4_logits_match_transformers_bnb(nf4_pair):
    ours, ref, dense = nf4_pair
    prompts = random_prompts([6, 21, 14], 512, seed=10)
    # The serving kernel against bitsandbytes' exact path.
    assert run_schedule(ours, ref, prompts, split=8, decode_steps=2) <= EXACT_TOL
    # Our exact path too (the oracle the other tests use), then back to the kernel.
    set_nf4_kernel(ours, False)
    kernel = ours.model.norm.kernel
    ours.set_pointwise_kernel(None)
    try:
        assert all(m.kernel is None for m in ours.modules() if isinstance(m, NF4Linear))
        assert run_schedule(ours, ref, prompts, split=8, decode_steps=2) <= EXACT_TOL
    finally:
        set_nf4_kernel(ours, True)
        ours.set_pointwise_kernel(kernel)
    # The quantization really changed the model: NF4 logits differ clearly from dense ones.
    tokens = prompts[1]
    gap = (reference_last_logits(dense, tokens) - reference_last_logits(ref, tokens)).abs().max().item()
    assert gap > 100 * EXACT_TOL


def test_nf4_weight_bytes(nf4_pair):
    ours, _, dense = nf4_pair
    # 4-bit codes + one float32 absmax per 64 weights for the linears, bitsandbytes' 16-entry
    # fp32 code book per linear; the rest
    # (embeddings, untied lm_head, norms) dense fp32
    linears = ours.lora_linears()
    linear_params = sum(l.in_features * l.out_features for l in linears.values())
    dense_params = sum(p.numel() for p in dense.parameters()) - linear_params
    # one code book per quantized matrix: q/k/v and gate/up are quantized fused (loader.FUSED)
    codebooks = 4 * len(ours.model.layers)
    expected = linear_params // 2 + linear_params // 64 * 4 + codebooks * 16 * 4 + dense_params * 4
    assert ours.weight_bytes() == expected


@pytest.mark.parametrize("kernel", [False, True])
def test_make_linear_nf4_matches_dequantized_reference(kernel):
    """One NF4 linear against a float64 matmul with bitsandbytes' own dequantized weight."""
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    b = torch.randn(96)
    lin = make_linear(w, b, "nf4", torch.device("cpu"), torch.float32)
    set_nf4_kernel(lin, kernel)
    assert (lin.kernel is not None) == kernel
    codes, _ = nf4_codes(lin)
    deq = F.dequantize_4bit(codes, lin.quant_state)  # (96, 128)
    assert (deq - w).abs().max().item() > 1e-4  # it is quantized, not the dense weight
    x = torch.randn(5, 128)
    with torch.inference_mode():
        y = lin(x)  # (5, 96)
    expected = x.double() @ deq.double().T + b.double()
    # float32 products and sums over 128 terms of outputs of magnitude ~1
    assert (y.double() - expected).abs().max().item() < 1e-5


# (out, in, batch): odd batches, batches past the kernel's 4-row tiles, out not a multiple
# of its 4-row groups, in at the 64 minimum, and SmolLM2's and Llama-8B's shapes
# (AMX: out a multiple of 32, one x tile of 16 rows, two, and three)
KERNEL_SHAPES = [(40, 64, 1), (41, 64, 3), (96, 128, 5), (1536, 576, 8), (576, 1536, 7),
                 (192, 576, 33), (578, 576, 2), (4096, 4096, 1), (128, 14336, 6), (64, 256, 0),
                 (64, 128, 20)]


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("out_f,in_f,batch", KERNEL_SHAPES)
def test_kernel_equals_bnb_dequantize_and_matmul(out_f, in_f, batch, isa):
    """The kernel, built for every instruction set this CPU has, reads the codes as bitsandbytes does (its own dequantization is
    bit-identical to dequantize_4bit) and its matmul equals a float64 matmul of the same
    float32 inputs within the set's bound, as a fraction of sum |x| |w| per output: 1e-6
    (float32 rounding), or AMX's bf16x3 bound (3 * 2^-16 per term, csrc/amx.h)."""
    import bitsandbytes.functional as F
    kernel = load_kernel(isa)
    assert kernel.isa == isa
    g = torch.Generator().manual_seed(out_f * 7 + in_f + batch)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    codes, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4",
                                quant_storage=torch.uint8)
    deq = F.dequantize_4bit(codes, qs)  # (out, in) float32
    assert torch.equal(kernel.nf4_dequantize(codes, qs.absmax, qs.code, out_f, in_f), deq)
    x = torch.randn(batch, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    y = kernel.nf4_matmul(x, codes, qs.absmax, qs.code, out_f, bias)  # (batch, out)
    expected = x.double() @ deq.double().T + bias.double()
    scale = x.double().abs() @ deq.double().abs().T + bias.double().abs()
    assert y.shape == (batch, out_f)
    if batch:
        assert ((y.double() - expected).abs() / scale).max().item() < MATMUL_REL_ERROR[isa]


@pytest.mark.parametrize("rows", [DENSE_ROWS - 1, DENSE_ROWS, 700])
def test_prefill_rows_take_the_dense_path_and_equal_the_reference(rows):
    """At DENSE_ROWS rows and more NF4Linear multiplies the kernel's dequantized weight with
    torch's float32 matmul; on both sides of the switch it equals the float64 reference
    within the kernel's bound."""
    import bitsandbytes.functional as F
    torch.manual_seed(rows)
    w = torch.randn(192, 576) * 0.05
    b = torch.randn(192)
    lin = make_linear(w, b, "nf4", torch.device("cpu"), torch.float32)
    set_nf4_kernel(lin, True)
    assert lin.kernel is not None
    deq = F.dequantize_4bit(nf4_codes(lin)[0], lin.quant_state).double()  # (192, 576)
    x = torch.randn(rows, 576)
    calls: list[str] = []
    bound = MATMUL_REL_ERROR[lin.kernel.isa]
    lin.kernel = _Spy(lin.kernel, calls)
    with torch.inference_mode():
        y = lin(x)  # (rows, 192)
    assert calls == (["nf4_dequantize"] if rows >= DENSE_ROWS else ["nf4_matmul"])
    expected = x.double() @ deq.T + b.double()
    scale = x.double().abs() @ deq.abs().T + b.double().abs()
    assert ((y.double() - expected).abs() / scale).max().item() < bound


class _Spy:
    """A CpuKernel stand-in that records which of its entry points a linear calls."""

    def __init__(self, kernel, calls: list) -> None:
        self._kernel, self._calls = kernel, calls

    def __getattr__(self, name):
        self._calls.append(name)
        return getattr(self._kernel, name)


@pytest.mark.parametrize("isa", supported_isas())
def test_kernel_reads_strided_rows(isa):
    """A view whose rows are strided (a slice of a wider activation) gives the same result."""
    import bitsandbytes.functional as F
    kernel = load_kernel(isa)
    torch.manual_seed(3)
    w = torch.randn(64, 128) * 0.05
    codes, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4",
                                quant_storage=torch.uint8)
    wide = torch.randn(5, 256)
    y = kernel.nf4_matmul(wide[:, :128], codes, qs.absmax, qs.code, 64, None)
    assert torch.equal(y, kernel.nf4_matmul(wide[:, :128].contiguous(), codes, qs.absmax, qs.code, 64, None))


def test_shapes_the_kernel_cannot_take_use_the_exact_path():
    torch.manual_seed(1)
    w = torch.randn(40, 96)  # in_features 96: NF4 blocks of 64 span rows, the kernel refuses
    lin = make_linear(w, None, "nf4", torch.device("cpu"), torch.float32)
    set_nf4_kernel(lin, True)
    assert lin.kernel is None
    import bitsandbytes.functional as F
    deq = F.dequantize_4bit(nf4_codes(lin)[0], lin.quant_state)  # (40, 96)
    x = torch.randn(3, 96)
    with torch.inference_mode():
        assert torch.allclose(lin(x), x @ deq.T, atol=1e-5)  # (3, 40)


def test_qkv_and_gate_up_run_fused_over_the_projections_codes(nf4_pair):
    """On the CPU each layer runs q/k/v and gate/up as one NF4 matmul; each projection's base
    is a view of the fused codes (the byte-identity test above compares those views with
    transformers' separately quantized modules), and the fused output is the projections'."""
    ours, _, _ = nf4_pair
    layer = ours.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    assert isinstance(attn.qkv, NF4Linear) and isinstance(mlp.gate_up, NF4Linear)
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert attn.qkv.out_features == sum(p.out_features for p in parts)
    storage = attn.qkv.weight.untyped_storage().data_ptr()
    assert all(p.base.weight.untyped_storage().data_ptr() == storage for p in parts)
    x = torch.randn(3, attn.qkv.in_features)
    with torch.inference_mode():
        fused = attn.qkv(x)  # (3, q + k + v)
        assert torch.equal(fused, torch.cat([p.base(x) for p in parts], dim=1))
        assert torch.equal(mlp.gate_up(x), torch.cat([mlp.gate_proj.base(x), mlp.up_proj.base(x)], dim=1))


def test_a_cpu_without_avx512_or_avx2_falls_back_to_the_exact_path_with_a_clear_message(monkeypatch, caplog):
    """Neither AVX-512 nor AVX2 (simulated): the kernels are not built, the message says what
    is missing, and the NF4 linear still computes, on bitsandbytes' dequantize + float32 matmul."""
    from server import cpu_build, cpu_kernel
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: ["sse2", "avx"])
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    lin = make_linear(w, None, "nf4", torch.device("cpu"), torch.float32)
    with caplog.at_level("WARNING"):
        why = set_nf4_kernel(lin, True)
    assert lin.kernel is None
    assert "need AVX-512 or AVX2 with FMA" in why and "avx512f" in why and "avx2 needs avx2, fma" in why
    assert "slower" in why and "avx2 needs avx2, fma" in caplog.text
    with pytest.raises(cpu_kernel.KernelUnavailable, match="AVX-512 or AVX2"):
        cpu_kernel.load()
    import bitsandbytes.functional as F
    x = torch.randn(2, 128)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), x @ F.dequantize_4bit(nf4_codes(lin)[0], lin.quant_state).T)
