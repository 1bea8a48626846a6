import os

from loadtest.cli import main
from loadtest.modelmap import ModelMap
from loadtest.record import load_run
from loadtest.report import write_outputs
from loadtest.runner import Runner
from loadtest.scenario import parse_scenario

from .fake_openai import FakeServer


def fake_run(phases=None, seed=0):
    raw = {"name": "rep", "seed": seed, "requests": 8, "arrivals": {"mode": "closed", "concurrency": 2},
           "adapters": {"popularity": "zipf", "count": 3}, "max_tokens": 6, "json_fraction": 0.5}
    if phases:
        raw["phases"] = phases
    s = parse_scenario(raw)
    return Runner(s, "http://fake:1", None, ModelMap(), progress=False, transport=FakeServer().transport()).run()


def test_outputs_round_trip_and_render(tmp_path):
    run = fake_run(phases=[{"name": "base-only", "adapters": {"popularity": "base"}}, {"name": "zipf"}])
    files = write_outputs(run, str(tmp_path))
    for f in files:
        assert os.path.getsize(tmp_path / f) > 0, f
    assert sorted(files) == ["itl_cdf.png", "results.json", "summary.md", "throughput.png", "ttft_cdf.png"]
    with open(tmp_path / "throughput.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    back = load_run(str(tmp_path))
    assert back == run
    md = (tmp_path / "summary.md").read_text()
    for needle in ("## Throughput", "## Latency", "## Per adapter", "| base-only | 8 | 8 | 0 | 0 |",
                   "| zipf | 8 | 8 |", "| all | 16 | 16 |", "![throughput.png](throughput.png)", "## Invalid JSON"):
        assert needle in md, needle
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_compare_cli_overlays_runs(tmp_path):
    for i in (0, 1):
        write_outputs(fake_run(seed=i), str(tmp_path / f"run{i}"))
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| run0 | 8 | 8 |" in md and "| run1 | 8 | 8 |" in md
    assert os.path.getsize(out / "compare.png") > 0


def test_cli_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text("requests: -1\n")
    assert main(["run", str(bad), "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path / "o")]) == 2
    assert "requests must be" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
