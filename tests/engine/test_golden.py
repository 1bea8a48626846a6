"""Greedy outputs stay byte-identical across refactors: 8 fixed runs (base and three adapters,
with and without a JSON schema, default model in NF4) against tests/data/golden_generate.json,
recorded on the exact path (`python -m tests.engine.golden FILE`; see golden.py), here run on
the serving NF4 kernel with the float32 LM head, adapters in float32 and in bfloat16 (the
serving default); and `loraplex generate` on the first prompt
(the full serving default, bf16 LM head included) against its recorded text. The bf16 head's
own greedy check is in tests/model/test_lm_head.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.engine.engine import Engine
from server.model.quant import NF4Linear
from tests.engine import golden

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "data" / "golden_generate.json").read_text())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return tmp_path_factory.mktemp("golden-adapters")


@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_greedy_outputs_equal_the_recorded_ones(adapters, lora_dtype):
    """lora_dtype bfloat16 is the serving default's adapter slots (A and B rounded to bf16):
    the same greedy text on these runs."""
    engine = Engine(golden.config(str(adapters), "float32", lora_dtype))
    assert all(m.kernel is not None for m in engine.model.modules() if isinstance(m, NF4Linear))
    slots = next(iter(engine.model.lora_linears().values())).slots
    assert slots.a.dtype == getattr(torch, lora_dtype)
    golden.write_adapters(adapters, engine)
    runs = golden.generate_all(engine)
    assert len(runs) == len(GOLDEN) == 8 and {r["adapter"] for r in runs} == {None, "gold-a", "gold-b", "gold-c"}
    assert {r["schema"] for r in runs} == {True, False}
    for now, then in zip(runs, GOLDEN):
        assert now == then, f"{now['prompt']!r} on {now['adapter']}: {now['text']!r} != {then['text']!r}"


def test_loraplex_generate_prints_the_recorded_text(adapters):
    first = GOLDEN[0]
    assert first["adapter"] is None and not first["schema"]
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--prompt", first["prompt"],
                           "--max-tokens", str(golden.MAX_TOKENS), "--adapters-dir", str(adapters),
                           "--kv-cache-tokens", "4096", "--max-loras", "4"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == first["text"] + "\n"
