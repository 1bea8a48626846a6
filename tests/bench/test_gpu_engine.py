"""bench/gpu_engine.py --dry-run: every section runs on CPU and reports finite numbers.

It runs with llguidance and bitsandbytes made unimportable (a sitecustomize on PYTHONPATH,
inherited by the script's child process), as on a GPU machine that lacks them: the engine
path, fidelity included, must need neither, and the NF4 section must say it was skipped.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("model", "fidelity_base", "fidelity_lora", "fidelity_lora_ieee", "throughput", "throughput_nf4")


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _dry_run(tmp_path, blocked: tuple[str, ...]) -> tuple[dict, str]:
    """Run the script with `blocked` modules unimportable; -> (its JSON, its stdout)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(site), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_engine.py"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_engine.json").read_text())
    assert set(SECTIONS) <= set(result) and result["failed"] == []
    assert all(math.isfinite(x) for x in _numbers(result))
    for m in blocked:
        assert result["env"][m].startswith("unavailable")
    return result, proc.stdout


def _check_throughput(runs: list[dict], plan: dict, counts: list[int], batches: list[int]) -> None:
    assert [(r["adapters"], r["batch"]) for r in runs] == [(n, b) for n in counts for b in batches]
    for r in runs:
        assert r["generated"] == r["expected_tokens"] == r["batch"] * plan["max_tokens"]
        assert r["tokens_per_s"] > 0 and r["decode_ms"] > 0
        assert r["distinct_in_batch"] == min(r["adapters"], r["batch"])


def test_dry_run_without_llguidance_or_bitsandbytes(tmp_path):
    result, stdout = _dry_run(tmp_path, ("llguidance", "bitsandbytes"))
    assert "skipped" in result["throughput_nf4"] and "skipped: bitsandbytes" in stdout
    assert result["model"]["vocab"] == 49152 and 1.0 < result["model"]["logits_std"] < 4.0
    base = result["fidelity_base"]
    assert base["within_tol"] and base["err"]["max"] <= 1e-3 and len(base["prompt_lengths"]) == 3
    for name in ("fidelity_lora", "fidelity_lora_ieee"):
        lora = result[name]
        assert lora["within_tol"] and lora["err"]["max"] <= 1e-3, lora
        assert lora["min_adapter_effect"] > 5e-3   # the adapters move their rows' logits
        assert lora["rows"][0] == "base" and len(set(lora["rows"])) == 4
    assert result["fidelity_lora_ieee"]["triton_f32_default"] == "ieee"
    plan = result["plan"]
    _check_throughput(result["throughput"], plan, plan["counts"], plan["batches"])
    assert "dec tok/s" in stdout


def test_dry_run_nf4_section(tmp_path):
    result, _ = _dry_run(tmp_path, ("llguidance",))
    plan = result["plan"]
    runs = result["throughput_nf4"]
    assert all(r["quantization"] == "nf4" for r in runs)
    _check_throughput(runs, plan, plan["nf4_counts"], plan["nf4_batches"])
