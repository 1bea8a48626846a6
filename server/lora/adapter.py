"""LoraAdapter: a PEFT LoRA adapter folder read, validated against the base, scale folded in.

A folder holds adapter_config.json and adapter_model.safetensors (never a pickled .bin).
Per module m of the base, PEFT's semantics decide whether m is targeted and with which
rank and alpha (rank_pattern / alpha_pattern), and the scale
    s_m = alpha_m / r_m            (alpha_m / sqrt(r_m) with use_rslora)
is folded into B once here, so serving computes y += B'·(A·x) with B' = s_m·B.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from server.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NOT_SUPPORTED = ("embed_tokens", "lm_head")   # embedding / output-head LoRA
_PREFIX = "base_model.model."                  # PEFT's prefix on every saved key


@dataclass(frozen=True)
class LoraArch:
    """The LoRA-capable linears of a base: HF module name -> (d_in, d_out)."""
    modules: dict[str, tuple[int, int]]

    @staticmethod
    def from_layers(layers: dict) -> "LoraArch":
        """From the model's {name: LinearWithLoRA}."""
        return LoraArch({n: (m.in_features, m.out_features) for n, m in layers.items()})

    @staticmethod
    def llama(hidden: int, intermediate: int, num_layers: int, num_heads: int, num_kv_heads: int,
              head_dim: int = 0) -> "LoraArch":
        """The seven decoder linears of every layer of a Llama-family model."""
        hd = head_dim or hidden // num_heads
        q, kv = num_heads * hd, num_kv_heads * hd
        shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv),
                  "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (q, hidden),
                  "mlp.gate_proj": (hidden, intermediate), "mlp.up_proj": (hidden, intermediate),
                  "mlp.down_proj": (intermediate, hidden)}
        return LoraArch({f"model.layers.{i}.{k}": v for i in range(num_layers) for k, v in shapes.items()})


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int                       # largest rank over the targeted modules
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...]        # short names, e.g. ("q_proj", "v_proj")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, d_in), B' (d_out, r)) fp32
    content_hash: str               # sha256 of config + weights bytes

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.content_hash[:16]}"

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _fail(path: str, problem: str) -> AdapterError:
    return AdapterError(f"adapter {path}: {problem}")


def _targeted(cfg: dict, key: str) -> bool:
    """PEFT's check_target_module_exists for a plain LoRA config."""
    excl = cfg.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith("." + e) for e in excl):
            return False
    tm = cfg.get("target_modules")
    if tm == "all-linear":
        return key.rsplit(".", 1)[-1] in TARGETS
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    found = key in tm or any(key.endswith("." + t) for t in tm)
    layers = cfg.get("layers_to_transform")
    if found and layers is not None and layers != []:
        pattern = cfg.get("layers_pattern")
        pats = [pattern] if isinstance(pattern, str) else (pattern or [])
        m = None
        if not pats:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def _pattern(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern matching a dotted suffix of key."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def _read_config(path: str) -> tuple[dict, bytes]:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise _fail(path, "not a folder")
    if not os.path.isfile(cfg_path):
        raise _fail(cfg_path, "missing (an adapter folder holds adapter_config.json and adapter_model.safetensors)")
    with open(cfg_path, "rb") as f:
        raw = f.read()
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise _fail(cfg_path, f"not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise _fail(cfg_path, "must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(cfg_path, f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise _fail(cfg_path, "use_dora is not supported (DoRA adapters need a magnitude vector)")
    if cfg.get("modules_to_save"):
        raise _fail(cfg_path, f"modules_to_save {cfg['modules_to_save']} is not supported")
    if cfg.get("bias", "none") != "none":
        raise _fail(cfg_path, f"bias {cfg['bias']!r} is not supported (only 'none')")
    for k in ("lora_bias", "target_parameters", "trainable_token_indices", "layer_replication",
              "fan_in_fan_out", "use_qalora", "alora_invocation_tokens"):
        if cfg.get(k):
            raise _fail(cfg_path, f"{k}={cfg[k]!r} is not supported")
    for k in ("r", "lora_alpha"):
        if not isinstance(cfg.get(k, 8), (int, float)) or cfg.get(k, 8) <= 0:
            raise _fail(cfg_path, f"{k} must be a positive number, got {cfg.get(k)!r}")
    tm = cfg.get("target_modules")
    if not isinstance(tm, (str, list)) or not tm:
        raise _fail(cfg_path, f"target_modules must be a list or a regex string, got {tm!r}")
    return cfg, raw


def _check_targets(cfg: dict, arch: LoraArch, cfg_path: str) -> list[str]:
    """The targeted base modules; refuses embedding/lm_head LoRA and unknown module names."""
    for special in ("model.embed_tokens", "lm_head"):
        if _targeted(cfg, special):
            raise _fail(cfg_path, f"LoRA on {special} (embedding / output head) is not supported")
    tm = cfg["target_modules"]
    if isinstance(tm, list):
        for t in tm:
            if t.rsplit(".", 1)[-1] in _NOT_SUPPORTED:
                raise _fail(cfg_path, f"LoRA on {t} (embedding / output head) is not supported")
            if not any(k == t or k.endswith("." + t) for k in arch.modules):
                raise _fail(cfg_path, f"unknown target module {t!r} (supported: {', '.join(TARGETS)})")
    targeted = [k for k in arch.modules if _targeted(cfg, k)]
    if not targeted:
        raise _fail(cfg_path, f"target_modules {tm!r} matches no module of the base")
    return targeted


def _module_of(key: str, path: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A[.default].weight' -> ('X', 'A')."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    if m is None:
        what = ("embedding" if "lora_embedding" in key else
                "DoRA magnitude" if "magnitude" in key else "unexpected")
        raise _fail(path, f"{what} tensor {key!r} is not supported")
    return m.group(1), m.group(2)


def _read_weights(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], bytes]:
    wpath = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wpath):
        bins = [f for f in ("adapter_model.bin", "pytorch_model.bin") if os.path.exists(os.path.join(path, f))]
        hint = f"; found {bins[0]}, which is a pickle and is never read (re-save with safe_serialization=True)" if bins else ""
        raise _fail(wpath, "missing" + hint)
    with open(wpath, "rb") as f:
        raw = f.read()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(wpath, framework="pt") as st:
            for key in st.keys():
                module, ab = _module_of(key, wpath)
                pairs.setdefault(module, {})[ab] = st.get_tensor(key).to(torch.float32)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise _fail(wpath, f"not a readable safetensors file: {e}") from e
    return pairs, raw


def content_hash(path: str) -> str:
    """sha256 of adapter_config.json + adapter_model.safetensors bytes (the adapter's identity)."""
    cfg, cfg_raw = _read_config(path)
    wpath = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wpath):
        raise _fail(wpath, "missing")
    with open(wpath, "rb") as f:
        return hashlib.sha256(cfg_raw + b"\0" + f.read()).hexdigest()


def read_adapter(name: str, path: str, arch: LoraArch, max_lora_rank: int) -> LoraAdapter:
    """Read and validate the adapter folder `path` against the base `arch`."""
    cfg, cfg_raw = _read_config(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    wpath = os.path.join(path, WEIGHTS_FILE)
    r0, alpha0, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora", False))
    try:   # target_modules, exclude_modules and the pattern keys are user-written regexes
        targeted = _check_targets(cfg, arch, cfg_path)
        params = {m: (_pattern(cfg.get("rank_pattern") or {}, m, r0),
                      _pattern(cfg.get("alpha_pattern") or {}, m, alpha0)) for m in targeted}
    except re.error as e:
        raise _fail(cfg_path, f"invalid regular expression: {e}") from e
    for module, (r, alpha) in params.items():
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
            raise _fail(cfg_path, f"{module}: rank {r!r} / lora_alpha {alpha!r} are not a positive int / a number")
        if r > max_lora_rank:
            raise _fail(cfg_path, f"LoRA rank {r} is greater than max_lora_rank {max_lora_rank}")
    pairs, w_raw = _read_weights(path)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in pairs:
        if module not in arch.modules:
            raise _fail(wpath, f"weights for {module!r}, which is not a LoRA-capable module of the base")
        if module not in targeted:
            raise _fail(wpath, f"weights for {module!r}, which adapter_config.json does not target")
    for module in targeted:
        if module not in pairs:
            raise _fail(wpath, f"no weights for targeted module {module!r}")
        if set(pairs[module]) != {"A", "B"}:
            raise _fail(wpath, f"{module!r} needs both lora_A and lora_B, found {sorted(pairs[module])}")
        r, alpha = params[module]
        a, b = pairs[module]["A"], pairs[module]["B"]
        d_in, d_out = arch.modules[module]
        if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            raise _fail(wpath, f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                               f"the base (expected ({r}, {d_in}) / ({d_out}, {r}))")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        weights[module] = (a.contiguous(), (b * scale).contiguous())  # (r, d_in), (d_out, r)
    digest = hashlib.sha256(cfg_raw + b"\0" + w_raw).hexdigest()
    short = sorted({m.rsplit(".", 1)[-1] for m in targeted}, key=lambda t: TARGETS.index(t))
    rank = max(a.shape[0] for a, _ in weights.values())
    return LoraAdapter(name, path, rank, float(alpha0), rslora, tuple(short), weights, digest)


def write_random_adapter(path: str, arch: LoraArch, r: int, alpha: float, targets: tuple[str, ...],
                         seed: int, use_rslora: bool = False, rank_pattern: dict | None = None,
                         alpha_pattern: dict | None = None, std: float = 0.05) -> str:
    """Write a PEFT-layout adapter with random non-zero A and B (tests, `loraplex bench`).

    Written to a temporary folder next to `path`, then renamed into place.
    """
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
           "target_modules": list(targets), "use_rslora": use_rslora, "bias": "none",
           "lora_dropout": 0.0, "use_dora": False, "rank_pattern": rank_pattern or {},
           "alpha_pattern": alpha_pattern or {}, "base_model_name_or_path": None, "inference_mode": True}
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in arch.modules.items():
        if not _targeted(cfg, module):
            continue
        rm = _pattern(cfg["rank_pattern"], module, r)
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = torch.randn(rm, d_in, generator=gen) * std
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = torch.randn(d_out, rm, generator=gen) * std
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=parent)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    if os.path.isdir(path):
        old = tempfile.mkdtemp(prefix=".old-adapter-", dir=parent)
        os.rename(path, os.path.join(old, "a"))
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    return path
