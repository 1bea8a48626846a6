"""NF4 micro-benchmark: microseconds per call of the NF4 paths and the dense fp32 matmul.

    python bench/nf4.py [--in 576] [--out 1536] [--batch 16] [--iters 200]

In one 576 -> 1536 shape by default (SmolLM2's gate/up): the server's NF4Linear on the
CPU kernel (`nf4_kernel`) and on its exact path (bitsandbytes' dequantize + float32
matmul, `nf4_exact`), bitsandbytes' own Linear4bit (on this CPU, its bf16 fallback kernel),
quantize_4bit + matmul_4bit on the canonical layout, and the dense fp32 linear.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from server.model.quant import NF4_BLOCKSIZE, make_linear, set_nf4_kernel  # noqa: E402


def benchmark(in_features: int = 576, out_features: int = 1536, batch: int = 16,
              iters: int = 200) -> dict[str, float]:
    """Microseconds per call of the NF4 paths and the dense fp32 matmul on this machine."""
    import bitsandbytes as bnb
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features) * 0.02
    x = torch.randn(batch, in_features)
    qw, qs = bnb.functional.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                          quant_type="nf4", quant_storage=torch.uint8)
    ours = make_linear(w, None, "nf4", torch.device("cpu"), torch.float32)
    set_nf4_kernel(ours, True)
    exact = make_linear(w, None, "nf4", torch.device("cpu"), torch.float32)
    set_nf4_kernel(exact, False)
    lin4 = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                             compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8)
    lin4.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                    quant_type="nf4", quant_storage=torch.uint8, module=lin4).to("cpu")
    lin4.eval()
    dense = make_linear(w, None, "none", torch.device("cpu"), torch.float32)
    paths = {
        "nf4_kernel": lambda: ours(x),
        "nf4_exact": lambda: exact(x),
        "linear4bit": lambda: lin4(x),
        "matmul_4bit": lambda: bnb.matmul_4bit(x, qw.t(), quant_state=qs),
        "dense_fp32": lambda: dense(x),
    }
    out: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in paths.items():
            for _ in range(5):
                fn()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out[name] = (time.perf_counter() - t0) / iters * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="in_features", type=int, default=576)
    p.add_argument("--out", dest="out_features", type=int, default=1536)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args(argv)
    print(json.dumps(benchmark(a.in_features, a.out_features, a.batch, a.iters), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
