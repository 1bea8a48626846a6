"""`loraplex generate`: stdout is the completion only, equal to transformers' greedy generate."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.model.default import ensure_default_model

PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.mark.slow
def test_generate_prints_only_the_completion(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", LORAPLEX_LOG_LEVEL="INFO")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--prompt", PROMPT, "--max-tokens", "24",
         "--quantization", "none", "--adapters-dir", str(tmp_path), "--kv-cache-tokens", "1024"],
        capture_output=True, text=True, env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "engine ready" in proc.stderr                  # logs go to stderr ...
    folder = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)
    expected = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in expected
    assert proc.stdout == expected + "\n"                  # ... stdout is the completion alone

