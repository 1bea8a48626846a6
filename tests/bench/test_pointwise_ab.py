"""bench/pointwise_ab.py: decode steps with the point-wise kernels and with torch's ops, alternated."""
from bench.pointwise_ab import main


def test_both_modes_run_and_the_ratio_is_printed(capsys):
    assert main(["--batch", "2", "--rounds", "2", "--block", "2"]) == 0
    out = capsys.readouterr().out
    kernels = float(out.split("point-wise kernels ")[1].split()[0])
    torch_ops = float(out.split("torch ops ")[1].split()[0])
    assert kernels > 0 and torch_ops > 0
    ratio = float(out.split("kernels/torch ")[1].split()[0])
    assert abs(ratio - kernels / torch_ops) < 0.01
