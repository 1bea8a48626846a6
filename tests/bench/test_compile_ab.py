"""bench/compile_ab.py: compiled and eager decode steps alternated in one engine."""
from bench.compile_ab import main


def test_both_modes_run_in_alternating_blocks_and_the_ratio_is_printed(capsys):
    assert main(["--batch", "2", "--rounds", "2", "--block", "2"]) == 0
    out = capsys.readouterr().out
    assert "s compiling" in out and "compiled/eager" in out
    compiled = out.split("blocks, compiled:")[1].split("\n")[0].split()
    eager = out.split("blocks, eager:")[1].split("\n")[0].split()
    assert len(compiled) == len(eager) == 2 and all(float(t) > 0 for t in compiled + eager)
    ratio = float(out.split("compiled/eager ")[1].split()[0])
    assert 0.1 < ratio < 10
