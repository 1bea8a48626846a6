"""bench/gpu_lora_kernels.py --dry-run: the GPU benchmark script runs end to end at tiny shapes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_writes_json(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_lora_kernels.py"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "lora_kernels.json").read_text())
    assert result["dry_run"] and not result["failures"]
    kinds = {r["case"] for r in result["rows"]}
    assert {"decode", "prefill"} <= kinds and any(k.endswith("padded") for k in kinds)
    assert {r["kernel"] for r in result["rows"]} == {"bgmv", "sgmv"}
    for r in result["rows"]:
        assert r["err_triton"] < 1e-4 and r["err_torch"] < 1e-4
        assert r["bytes"] > 0 and r["triton_us"] > 0 and r["torch_us"] > 0
    assert "tri_GB/s" in proc.stdout
