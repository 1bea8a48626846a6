"""bench/step_profile.py: it profiles decode steps and reports the byte floor it measured."""
from bench.step_profile import main, read_gb_s


def test_read_bandwidth_is_measured():
    assert 0.1 < read_gb_s(mib=16, reps=2) < 10_000


def test_profile_prints_the_step_and_its_floor(capsys):
    assert main(["--batch", "2", "--steps", "2", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "ms per decode step" in out and "x the floor" in out
    mb = float(out.split("byte floor: ")[1].split(" MB")[0])
    # SmolLM2-135M: ~53 MB of NF4 codes + absmax, plus the 57 MB bf16 LM head
    assert 100 < mb < 130
