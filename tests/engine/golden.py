"""The fixed generation runs whose greedy outputs are kept in tests/data/golden_generate.json:
8 prompts on the default model (NF4), on the base and three random adapters, with and
without a JSON schema, each run alone as `loraplex generate` runs it.

    python -m tests.engine.golden OUT.json     # writes the outputs of this checkout

The file is recorded on the exact path: bitsandbytes' float32 dequantize + matmul for the
NF4 linears and the float32 LM head (`oracle_engine`). It was first recorded on
bitsandbytes' bf16 CPU kernel, the serving path then; 4 of the 8 runs changed when the
serving path became float32 (the CPU NF4 kernel, which the golden test shows equal to
the exact path, token for token).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.lora.adapter import TARGETS, LoraArch, write_random_adapter
from server.structured.grammar import GrammarCompiler, new_matcher
from server.structured.spec import ConstraintSpec

ADAPTERS = {"gold-a": 21, "gold-b": 22, "gold-c": 23}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer"}}, "required": ["city", "population"]}
PROMPTS = ["What is the capital of France?", "Name three colors.", "Describe the sea in one sentence.",
           "Give me a fact about Paris as JSON.", "Count from one to five.", "Which city is the largest in Japan?",
           "Write a haiku about rain.", "Reply with the biggest city of Italy as JSON."]
RUNS = [(p, (None, "gold-a", "gold-b", "gold-c")[i % 4], i in (3, 6, 7)) for i, p in enumerate(PROMPTS)]
MAX_TOKENS = 32


def write_adapters(folder: Path, engine: Engine) -> None:
    arch = LoraArch.from_layers(engine.model.lora_linears())
    for name, seed in ADAPTERS.items():
        write_random_adapter(str(folder / name), arch, r=16, alpha=32.0, targets=TARGETS, seed=seed, std=0.05)


def generate_all(engine: Engine) -> list[dict]:
    compiler = GrammarCompiler(engine.tokenizer.hf)
    grammar = compiler.compile(ConstraintSpec("json", json.dumps(SCHEMA, separators=(",", ":"))))
    out = []
    for prompt, adapter, schema in RUNS:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        req = Request(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), adapter=adapter,
                      constraint=new_matcher(grammar) if schema else None)
        engine.add_request(req)
        text = ""
        while engine.has_unfinished():
            for o in engine.step():
                text += o.new_text
        out.append({"prompt": prompt, "adapter": adapter, "schema": schema, "text": text,
                    "token_ids": req.output_ids, "finish_reason": req.finish_reason.value})
    compiler.close()
    return out


def config(adapters_dir: str, lm_head_dtype: str, lora_dtype: str = "float32") -> EngineConfig:
    return EngineConfig(adapters_dir=adapters_dir, kv_cache_tokens=4096, max_loras=4, lm_head_dtype=lm_head_dtype,
                        lora_dtype=lora_dtype)


def oracle_engine(adapters_dir: str) -> Engine:
    """The exact path: float32 dequantize + matmul (bitsandbytes), float32 LM head, RMSNorm,
    rotary and SiLU as torch ops."""
    from server.model.quant import set_nf4_kernel
    engine = Engine(config(adapters_dir, "float32"))
    set_nf4_kernel(engine.model, False)
    engine.model.set_pointwise_kernel(None)
    return engine


def main(path: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        engine = oracle_engine(tmp)
        write_adapters(Path(tmp), engine)
        runs = generate_all(engine)
    Path(path).write_text(json.dumps(runs, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
