"""bench/nf4.py: every NF4 path and the dense matmul are timed."""
from bench.nf4 import benchmark


def test_benchmark_reports_every_path():
    timings = benchmark(in_features=64, out_features=64, batch=2, iters=2)
    assert set(timings) == {"nf4_kernel", "nf4_exact", "linear4bit", "matmul_4bit", "dense_fp32"}
    assert all(t > 0 for t in timings.values())
