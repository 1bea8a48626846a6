"""`loadtest peers`: CPU accounting of a process group, the table, and one real run on loraplex
alone (peer servers never run in the test suite; their commands are checked, not started)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest
import yaml

from loadtest.bench import write_adapters
from loadtest.peers import group_cpu_s, peers, run_peers, table


def test_group_cpu_counts_every_process_of_the_group():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)"
    leader = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {burn!r}]); exec({burn!r})"],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while group_cpu_s(leader.pid) < 1.2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert 1.2 <= group_cpu_s(leader.pid) < 5  # leader and child, 0.6 s each
        assert group_cpu_s(os.getpgrp()) != group_cpu_s(leader.pid)  # another group is not counted
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()


def test_peer_commands_use_the_peer_scripts_and_the_adapters(tmp_path):
    table_ = peers("/p", str(tmp_path), "/py")
    assert table_["vllm"].command == ["bash", "/p/serve-vllm-cpu.sh", "{port}"]
    assert table_["vllm-lora"].command[-2:] == ["--lora", str(tmp_path)] and table_["vllm-lora"].adapters
    assert table_["llamacpp-lora"].model_map.resolve("a2").body == {"lora": [{"id": 1, "scale": 1.0}]}
    assert table_["vllm"].model_map.resolve("base").model.endswith("/vllm/model")
    assert table_["loraplex"].command[:3] == ["/py", "-m", "server.cli"] and not table_["llamacpp"].adapters
    assert table_["loraplex-compiled"].command == table_["loraplex"].command + ["--compile", "on"]


def test_table_marks_skipped_and_failed_cells():
    rows = [{"server": "a", "scenario": "s1", "ok": 4, "requests": 4, "output_tok_s": 10.0, "cpu_cores": 1.5,
             "json_valid": "", "ttft_p50": 0.25, "ttft_p99": 1.5},
            {"server": "b", "scenario": "s1", "ok": 3, "requests": 4, "output_tok_s": 5.0, "cpu_cores": 0.5,
             "json_valid": "2/2", "ttft_p50": 0.5, "ttft_p99": 2.0}]
    md = table(rows, ["s1", "s2"], "0.1 0.2 0.3")
    assert "| a | 10.0 (1.50) | – |" in md
    assert "| b | 5.0 (0.50) 3/4 ok json 2/2 | – |" in md and "0.1 0.2 0.3" in md
    assert "| a | 0.250 / 1.500 | – |" in md and "| b | 0.500 / 2.000 | – |" in md


@pytest.mark.e2e
def test_a_run_on_loraplex_writes_the_table_and_every_run(tmp_path):
    adapters = tmp_path / "adapters"
    write_adapters(["a1", "a2"], str(adapters), "default", rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    for name, popularity in (("tiny-base", {"popularity": "base"}), ("tiny-adapters", {"popularity": "uniform", "count": 2})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "seed": 0, "arrivals": {"mode": "closed", "concurrency": 2}, "requests": 4,
            "duration_s": 300, "adapters": popularity, "prompt_tokens": {"dist": "uniform", "min": 8, "max": 16},
            "max_tokens": 6, "ignore_eos": True, "temperature": 0.0}))
    out = tmp_path / "out"
    args = argparse.Namespace(peers_dir=str(tmp_path), adapters=str(adapters), out=str(out), servers="loraplex",
                              scenarios=f"{tmp_path}/tiny-base.yaml,{tmp_path}/tiny-adapters.yaml", ready_timeout=300.0)
    assert run_peers(args) == 0
    md = (out / "peers.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| loraplex |"))
    assert row.count("(") == 2 and "ok" not in row  # both scenarios measured, every request ok
    assert (out / "peers.png").stat().st_size > 0
    assert (out / "loraplex-tiny-adapters" / "results.json").is_file()
