"""run_bench: the JSON it writes accounts for every requested token, at each batch size."""
import json

from server.config import EngineConfig
from bench.engine import BenchArgs, run_bench


def test_bench_writes_consistent_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = BenchArgs(prompts=3, batch_sizes="1,3", max_tokens=3, adapters=2, out=str(out))
    config = EngineConfig(quantization="nf4", kv_cache_tokens=512, adapters_dir=str(tmp_path / "none"))
    assert run_bench(config, args) == 0
    result = json.loads(out.read_text())
    assert result["quantization"] == "nf4" and result["adapters"] == 2
    assert 0 < result["weight_mib"] < 300    # NF4 decoder linears: well under fp32's ~513 MiB
    runs = result["runs"]
    assert [r["batch_size"] for r in runs] == [1, 3]
    for r in runs:
        assert r["generated_tokens"] == 3 * 3 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
    assert runs[0]["steps"] == 3 * 3 and runs[1]["steps"] == 3   # batch 1: one token a step; batch 3: together
    table = capsys.readouterr().out
    assert "tokens/s" in table and table.count("\n") == 4
