"""The engine on one GPU: fp32 fidelity against transformers / PEFT, then decode throughput.

The model is random (fixed seed) with SmolLM2-135M's shapes and tokenizer, whose small files
are in bench/assets/smollm2-tokenizer; no weights are downloaded. Sections, each caught on
its own so one failure does not lose the rest:

  fidelity_base       our model vs transformers, fp32 on the device (TF32 off): 3 prompts of
                      different lengths prefilled in one batch, then 2 decode steps through the
                      paged KV cache; max |logits diff|.
  fidelity_lora       the same with 3 random PEFT adapters (r 8 / 16, all 7 modules) and a
                      base row in one mixed batch vs transformers + PeftModel per adapter; on
                      CUDA our LoRA path is Triton (tl.dot takes fp32 inputs as TF32 by
                      default), so it is also run with the torch LoRA ops on the same device.
  fidelity_lora_ieee  fidelity_lora again in a child process with TRITON_F32_DEFAULT=ieee.
  throughput          Engine, bf16, decode-heavy (32-token prompts, 64 new tokens, ignore_eos)
                      at batch 1 / 16 / 64 with 0 / 1 / 8 / 32 adapters (r 16) round-robin.
  throughput_nf4      the same for NF4 with 0 / 8 adapters at batch 16 / 64 (needs bitsandbytes).

Prints tables; writes $OUT/gpu_engine.json when OUT is set; exits 1 if a section failed.

    python bench/gpu_engine.py            # on a CUDA GPU, 2-4 minutes on an H100
    python bench/gpu_engine.py --dry-run  # tiny shapes on CPU
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "bench", "assets", "smollm2-tokenizer")
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
TOL = 1e-3
DECODE_STEPS = 2
BASE_LENGTHS = [11, 27, 6]
LORA_LENGTHS = [11, 27, 6, 19, 8]
LORA_ROWS = [None, "fid-r8", "fid-r16", "fid-r16b", "fid-r8"]      # adapter of each row
LORA_ADAPTERS = {"fid-r8": (8, 16.0), "fid-r16": (16, 32.0), "fid-r16b": (16, 12.0)}  # rank, alpha
TEXT = ("Write a long and detailed story about a lighthouse keeper who finds a message in a bottle "
        "that was sent from the far future, and describe every step of the journey that follows.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--lora-fidelity-only", metavar="MODEL_DIR", default=None,
                   help="(child process) run fidelity_lora on MODEL_DIR and print its JSON")
    return p.parse_args(argv)


def plan(dry: bool) -> dict:
    if dry:
        return dict(device="cpu", dtype="float32", batches=[1, 4], counts=[0, 2], nf4_batches=[4],
                    nf4_counts=[0, 2], max_tokens=4, kv_tokens=1024)
    return dict(device="cuda", dtype="bfloat16", batches=[1, 16, 64], counts=[0, 1, 8, 32],
                nf4_batches=[16, 64], nf4_counts=[0, 8], max_tokens=64, kv_tokens=16384)


def build_model(folder: str, dry: bool) -> dict:
    """Random weights for the asset config (tiny with dry) saved as safetensors in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.fixtures import randomize_
    os.makedirs(folder, exist_ok=True)
    for name in SMALL_FILES:
        shutil.copy(os.path.join(ASSETS, name), os.path.join(folder, name))
    with open(os.path.join(ASSETS, "config.json")) as f:
        cfg = json.load(f)
    if dry:
        cfg.update(TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).eval()
    randomize_(model, 0)   # norms away from one, so a missing or misplaced norm shows
    g = torch.Generator().manual_seed(1)
    hidden = model.config.hidden_size
    with torch.no_grad():  # tied head: embedding rows of norm ~2 give logits of std ~2
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=g) * (2.0 / math.sqrt(hidden)))
        logits = model(torch.tensor([list(range(100, 116))])).logits[0]  # (16, vocab)
    model.save_pretrained(folder)
    return dict(params=sum(p.numel() for p in model.parameters()), layers=model.config.num_hidden_layers,
                hidden=hidden, vocab=model.config.vocab_size, logits_std=logits.std().item())


# -- fidelity ------------------------------------------------------------------------------
def _run_ours(model, prompts, row_slots, device, forced=None):
    """Prefill all prompts in one batch, then DECODE_STEPS decode steps through a shuffled paged
    cache. -> ([(logits (B, V), token lists the logits are for)] per step, chosen tokens per step)."""
    import torch

    from server.lora.mapping import LoraBatch
    from bench.fixtures import PagedSequences
    n_blocks = sum(len(p) + DECODE_STEPS + 16 for p in prompts) // 4 + 8
    model.allocate_kv_cache(n_blocks, 4)
    pages = PagedSequences(n_blocks, 4, seed=2)
    seqs = [list(p) for p in prompts]
    new = dict(enumerate(prompts))
    steps, chosen = [], []
    for step in range(DECODE_STEPS + 1):
        batch = pages.step(new, device)
        slots = [row_slots[i][0] for i, toks in new.items() for _ in toks]
        ranks = [row_slots[i][1] for i, toks in new.items() for _ in toks]
        if max(slots) >= 0:
            batch.lora = LoraBatch.from_row_slots(slots, ranks, device)
        logits = model(batch)  # (B, V) float32
        steps.append((logits, [list(s) for s in seqs]))
        nxt = forced[step] if forced is not None else logits.argmax(-1).tolist()
        chosen.append(nxt)
        for i, tok in enumerate(nxt):
            seqs[i].append(tok)
        new = {i: [tok] for i, tok in enumerate(nxt)}
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps, chosen


def _reference(ref, adapter_path: str | None, token_lists: list[list[int]], device):
    """transformers (+ PeftModel with that adapter alone, unmerged) last-token logits (N, V)."""
    import torch
    from peft import PeftModel
    with torch.no_grad():
        model = ref if adapter_path is None else PeftModel.from_pretrained(ref, adapter_path).eval()
        try:
            return torch.stack([model(torch.tensor([t], device=device)).logits[0, -1].float()
                                for t in token_lists])  # (N, V)
        finally:
            if adapter_path is not None:
                model.unload()


def _errors(steps, rows, refs) -> dict:
    """Max |ours - reference| for base and adapter rows, prefill (step 0) and decode steps."""
    out = {"base_prefill": 0.0, "base_decode": 0.0, "adapter_prefill": 0.0, "adapter_decode": 0.0}
    for s, (logits, _) in enumerate(steps):
        for i, name in enumerate(rows):
            err = (logits[i] - refs[(s, i)]).abs().max().item()
            key = ("base" if name is None else "adapter") + ("_prefill" if s == 0 else "_decode")
            out[key] = max(out[key], err)
    if all(n is None for n in rows):
        out = {k: v for k, v in out.items() if k.startswith("base")}
    out["max"] = max(out.values())
    return out


def fidelity(model_dir: str, device_name: str, with_lora: bool) -> dict:
    import torch
    from transformers import LlamaForCausalLM as HFLlama

    from server.config import EngineConfig
    from server.lora.adapter import TARGETS, LoraArch, write_random_adapter
    from server.model.loader import load_model
    from bench.fixtures import random_prompts
    device = torch.device(device_name)
    rows = LORA_ROWS if with_lora else [None] * len(BASE_LENGTHS)
    with tempfile.TemporaryDirectory(prefix="gpu-engine-fid-") as adapters_dir:
        cfg = EngineConfig(model=model_dir, quantization="none", dtype="float32", device=device.type,
                           adapters_dir=adapters_dir, max_loras=4, max_cpu_loras=4, max_lora_rank=16)
        model = load_model(cfg, device, torch.float32)
        ref = HFLlama.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        store, slot = None, {None: (-1, 0)}
        if with_lora:
            from server.lora.store import AdapterStore
            arch = LoraArch.from_layers(model.lora_linears())
            for i, (name, (r, alpha)) in enumerate(LORA_ADAPTERS.items()):
                write_random_adapter(os.path.join(adapters_dir, name), arch, r=r, alpha=alpha,
                                     targets=TARGETS, seed=100 + i)
            store = AdapterStore(cfg, model.lora_linears(), device, torch.float32)
            end = time.monotonic() + 120
            for name in LORA_ADAPTERS:
                while not store.request_resident(name):
                    if time.monotonic() > end:
                        raise RuntimeError(f"adapter {name} did not become resident in 120 s")
                    store.poll()
                    time.sleep(0.005)
                slot[name] = store.slot_and_rank(name)
        prompts = random_prompts(LORA_LENGTHS if with_lora else BASE_LENGTHS, ref.config.vocab_size, seed=3)
        row_slots = [slot[n] for n in rows]
        steps, chosen = _run_ours(model, prompts, row_slots, device)
        refs, effect = {}, float("inf")
        for name in [None] + (list(LORA_ADAPTERS) if with_lora else []):
            keys = [(s, i) for s in range(len(steps)) for i, n in enumerate(rows) if n == name]
            tokens = [steps[s][1][i] for s, i in keys]
            path = None if name is None else os.path.join(adapters_dir, name)
            want = _reference(ref, path, tokens, device)  # (N, V)
            if name is not None:  # how far the adapter moves its rows from the base model
                base = _reference(ref, None, tokens, device)
                effect = min(effect, (want - base).abs().amax(-1).min().item())
            refs.update({k: want[j] for j, k in enumerate(keys)})
        result = {"device": str(device), "rows": [n or "base" for n in rows], "prompt_lengths":
                  [len(p) for p in prompts], "decode_steps": DECODE_STEPS, "tol": TOL,
                  "err": _errors(steps, rows, refs)}
        if with_lora:
            from server.lora.ops import TORCH_OPS
            backend = next(iter(model.lora_linears().values())).slots.ops   # chosen once at load
            result["lora_backend"] = backend.name
            result["min_adapter_effect"] = effect
            result["triton_f32_default"] = os.environ.get("TRITON_F32_DEFAULT", "")
            if backend.name != TORCH_OPS.name:  # same device, same tokens, torch LoRA ops
                for layer in model.lora_linears().values():
                    layer.slots.ops = TORCH_OPS
                steps2, _ = _run_ours(model, prompts, row_slots, device, forced=chosen)
                result["err_torch_ops"] = _errors(steps2, rows, refs)
            store.close()
        result["within_tol"] = result["err"]["max"] <= TOL
    del model, ref
    _free_memory()
    return result


def fidelity_ieee_child(model_dir: str, dry: bool) -> dict:
    """fidelity_lora in a fresh process where Triton's fp32 tl.dot is exact (ieee), not TF32."""
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee")
    with tempfile.TemporaryDirectory(prefix="gpu-engine-triton-") as cache:
        env["TRITON_CACHE_DIR"] = cache   # no kernel compiled with the other precision is reused
        cmd = [sys.executable, os.path.abspath(__file__), "--lora-fidelity-only", model_dir]
        proc = subprocess.run(cmd + (["--dry-run"] if dry else []), env=env, capture_output=True,
                              text=True, timeout=150)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- throughput ----------------------------------------------------------------------------
def _drive(engine, prompts, adapters, max_tokens: int) -> dict:
    """All requests at once, stepped to completion; per-step wall times."""
    from server.engine.offline import drive
    from server.engine.request import Request, SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [Request(list(ids), params, adapter=adapter) for ids, adapter in zip(prompts, adapters)]

    def check(out) -> None:
        if out.error:
            raise RuntimeError(f"request failed: {out.error}")
    stats = drive(engine, reqs, len(reqs), check, timeout_s=120)
    busy = stats.busy
    return {"wall_s": stats.wall_s, "generated": stats.generated, "steps": stats.steps,
            "idle_steps": stats.idle_steps, "prefill_ms": 1e3 * busy[0],
            "decode_ms": 1e3 * statistics.median(busy[1:] or busy)}


def throughput(model_dir: str, quantization: str, counts: list[int], batches: list[int], p: dict) -> list[dict]:
    import torch

    from server.config import EngineConfig
    from bench.engine import write_adapters
    from server.engine.engine import Engine
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="gpu-engine-adapters-") as adapters_dir:
            cfg = EngineConfig(model=model_dir, quantization=quantization, dtype=p["dtype"], device=p["device"],
                               adapters_dir=adapters_dir, max_loras=max(n, 1), max_num_seqs=64,
                               kv_cache_tokens=p["kv_tokens"], max_lora_rank=16)
            engine = None
            try:
                t0 = time.perf_counter()
                engine = Engine(cfg)
                load_s = time.perf_counter() - t0
                names = write_adapters(engine, adapters_dir, n)
                prompts = [engine.tokenizer.encode(f"Request {i}. {TEXT}")[:32] for i in range(max(batches))]
                for b in batches:
                    adapters = [names[i % n] if n else None for i in range(b)]
                    row = {"quantization": quantization, "adapters": n, "distinct_in_batch": min(n, b),
                           "batch": b, "max_tokens": p["max_tokens"], "engine_load_s": round(load_s, 2)}
                    try:
                        _drive(engine, prompts[:b], adapters, min(4, p["max_tokens"]))  # warm-up
                        run = _drive(engine, prompts[:b], adapters, p["max_tokens"])
                        row.update(run, tokens_per_s=run["generated"] / run["wall_s"],
                                   decode_tokens_per_s=1e3 * b / run["decode_ms"],
                                   expected_tokens=b * p["max_tokens"])
                    except Exception as e:  # noqa: BLE001 (one configuration's failure is reported, not fatal)
                        traceback.print_exc()
                        row["error"] = f"{type(e).__name__}: {e}"
                        for rid in list(engine.live_request_ids()):
                            engine.abort(rid)
                    rows.append(row)
                    _print_row(row)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"quantization": quantization, "adapters": n, "error": f"{type(e).__name__}: {e}"})
            finally:
                if engine is not None:
                    engine.store.close()
                del engine
                _free_memory()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return rows


def _free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- report --------------------------------------------------------------------------------
def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['quantization']:5} adapters {r['adapters']:>2} batch {r.get('batch', '-')}: ERROR {r['error']}")
        return
    print(f"  {r['quantization']:5} {r['adapters']:>8} {r['distinct_in_batch']:>8} {r['batch']:>5} "
          f"{r['tokens_per_s']:>9.1f} {r['decode_tokens_per_s']:>10.1f} {r['decode_ms']:>9.2f} "
          f"{r['prefill_ms']:>10.2f} {r['steps']:>5} {r['generated']:>6}/{r['expected_tokens']}", flush=True)


THROUGHPUT_HEAD = (f"  {'quant':5} {'adapters':>8} {'distinct':>8} {'batch':>5} {'tok/s':>9} {'dec tok/s':>10} "
                   f"{'dec ms':>9} {'prefill ms':>10} {'steps':>5} {'tokens':>10}")


def _print_fidelity(name: str, r: dict) -> None:
    if "err" not in r:
        return
    line = ", ".join(f"{k} {v:.2e}" for k, v in r["err"].items())
    print(f"  {name}: {line}  -> {'within' if r['within_tol'] else 'OUTSIDE'} {TOL:g}")
    if "err_torch_ops" in r:
        print(f"  {name} with torch LoRA ops: " + ", ".join(f"{k} {v:.2e}" for k, v in r["err_torch_ops"].items()))
    if "min_adapter_effect" in r:
        print(f"  {name}: backend {r['lora_backend']}, smallest adapter effect {r['min_adapter_effect']:.2e}")


def header() -> dict:
    import torch
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for mod in ("triton", "peft", "bitsandbytes", "llguidance"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 (absent or broken: reported, not fatal)
            info[mod] = f"unavailable ({type(e).__name__})"
    print("# " + "  ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    return info


def run_section(result: dict, name: str, fn) -> None:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as e:  # noqa: BLE001 (each section is reported on its own)
        traceback.print_exc()
        result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  ERROR {result[name]['error']}", flush=True)
    result["seconds"][name] = round(time.perf_counter() - t0, 2)
    write_json(result)   # after every section, so a run cut short keeps what it measured


def write_json(result: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        from loadtest.record import write_atomic
        write_atomic(os.path.join(out, "gpu_engine.json"), json.dumps(result, indent=1).encode())


def print_summary(result: dict) -> None:
    """Everything measured, again, at the end of the output."""
    env = result["env"]
    print(f"\n# summary: {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"bitsandbytes {env['bitsandbytes']}  dry_run {result['dry_run']}")
    for name in ("fidelity_base", "fidelity_lora", "fidelity_lora_ieee"):
        r = result.get(name, {})
        if "error" in r:
            print(f"  {name}: ERROR {r['error']}")
        _print_fidelity(name, r)
    print(THROUGHPUT_HEAD)
    for name in ("throughput", "throughput_nf4"):
        r = result.get(name, {})
        if isinstance(r, list):
            for row in r:
                _print_row(row)
        else:
            print(f"  {name}: {r}")


def _failed(value) -> bool:
    if isinstance(value, dict):
        return "error" in value
    return isinstance(value, list) and any("error" in r for r in value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, ROOT)
    import torch
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 comparisons must be fp32
    torch.backends.cudnn.allow_tf32 = False
    p = plan(args.dry_run)
    if args.lora_fidelity_only:
        print("RESULT " + json.dumps(fidelity(args.lora_fidelity_only, p["device"], True)), flush=True)
        return 0
    t0 = time.perf_counter()
    result: dict = {"dry_run": args.dry_run, "plan": p, "env": header(), "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-engine-") as tmp:
        model_dir = os.path.join(tmp, "model")
        run_section(result, "model", lambda: build_model(model_dir, args.dry_run))
        print(f"  {result['model']}")
        run_section(result, "fidelity_base", lambda: fidelity(model_dir, p["device"], False))
        _print_fidelity("fidelity_base", result["fidelity_base"])
        run_section(result, "fidelity_lora", lambda: fidelity(model_dir, p["device"], True))
        _print_fidelity("fidelity_lora", result["fidelity_lora"])
        run_section(result, "fidelity_lora_ieee", lambda: fidelity_ieee_child(model_dir, args.dry_run))
        _print_fidelity("fidelity_lora_ieee", result["fidelity_lora_ieee"])
        print(THROUGHPUT_HEAD)
        run_section(result, "throughput", lambda: throughput(model_dir, "none", p["counts"], p["batches"], p))
        try:
            importlib.import_module("bitsandbytes")
        except ImportError as e:
            print(f"== throughput_nf4\n  skipped: bitsandbytes does not import ({e})")
            result["throughput_nf4"] = {"skipped": f"bitsandbytes does not import: {e}"}
            write_json(result)
        else:
            print(THROUGHPUT_HEAD)
            run_section(result, "throughput_nf4",
                        lambda: throughput(model_dir, "nf4", p["nf4_counts"], p["nf4_batches"], p))
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print_summary(result)
    failed = [k for k, v in result.items() if _failed(v)]
    print(f"# total {result['total_s']} s; sections: {result['seconds']}; failed: {failed or 'none'}")
    result["failed"] = failed
    write_json(result)
    if os.environ.get("OUT"):
        print(f"wrote {os.path.join(os.environ['OUT'], 'gpu_engine.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
