"""load_model: an HF safetensors folder, a .gguf file or "default" -> LlamaForCausalLM.

Weights are read tensor by tensor with safetensors' safe_open (sharded checkpoints through
model.safetensors.index.json) and placed by their HF names; each decoder linear is
quantized (or kept dense) as it is read, so the full-precision model never sits in memory
at once. GGUF files are converted once through transformers into the cache, keyed by the
file's SHA-256. Every problem with the path, config or weights is a ModelLoadError that
names the file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from server.config import EngineConfig, cache_dir
from server.errors import ModelLoadError
from server.lora.slots import allocate_slots
from server.model.llama import LlamaArch, LlamaForCausalLM
from server.model.quant import NF4_BLOCKSIZE, make_linear, row_slice, set_nf4_kernel

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def load_model(config: EngineConfig, device: torch.device | str, dtype: torch.dtype) -> LlamaForCausalLM:
    """config.model's weights on `device`, decoder linears per config.quantization, the rest
    (embeddings, norms, lm_head) dense in `dtype`, and every LoRA linear's adapter slots
    (config.max_loras x config.max_lora_rank) on the LoRA backend chosen once for the device.
    No KV cache yet: allocate_kv_cache."""
    device = torch.device(device)
    folder = resolve_model_dir(config.model)
    arch = read_arch(folder)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(arch, device, dtype)
    with Checkpoint(folder) as ckpt:
        _load_linears(model, ckpt, config.quantization, device, dtype)
        _load_dense(model, ckpt, device, dtype)
    model.eval()
    kernel = _cpu_kernel(device)
    if config.quantization == "nf4" and kernel is not None:
        log.info("NF4 matmul on CPU: %s", set_nf4_kernel(model, True))
    _choose_lm_head(model, config, kernel, dtype)
    _choose_attention(model, kernel, dtype)
    if kernel is not None and dtype == torch.float32:
        model.set_pointwise_kernel(kernel)  # RMSNorm, rotary + K/V write, SiLU * up: one call each
    allocate_slots(model.lora_linears(), config.max_loras, config.max_lora_rank, device, dtype,
                   _lora_storage(model, config, kernel, dtype))
    log.info("loaded %s (%s, %d layers, %s, %s) in %.1f s: %.1f MiB of weights", folder, arch.architecture,
             arch.num_layers, config.quantization, str(dtype).replace("torch.", ""),
             time.perf_counter() - t0, model.weight_bytes() / 2**20)
    return model


def _cpu_kernel(device: torch.device):
    """The CPU kernels (server/cpu_kernel.py) on a CPU where they build, else None, said once:
    then NF4 takes bitsandbytes' exact dequantize + matmul, the LM head stays float32 and
    attention takes the torch path (the same maths, slower)."""
    if device.type != "cpu":
        return None
    from server.cpu_kernel import KernelUnavailable, load
    try:
        return load()
    except KernelUnavailable as e:
        log.warning("CPU kernels unavailable, exact torch paths instead (slower): %s", e)
        return None


def _wants_bf16(option: str, wanted: str, fits: bool, need: str, config: EngineConfig) -> bool:
    """Whether a weight `option` (lm_head_dtype, lora_dtype) set to `wanted` takes bfloat16:
    asked for, or auto on an NF4 model where it `fits` (a float32 model on the CPU kernels);
    raises ModelLoadError saying `need` when it is asked for and does not fit."""
    if wanted == "bfloat16" and not fits:
        raise ModelLoadError(f"{option} bfloat16 needs {need}")
    return wanted == "bfloat16" or (wanted == "auto" and config.quantization == "nf4" and fits)


def _choose_lm_head(model: LlamaForCausalLM, config: EngineConfig, kernel, dtype: torch.dtype) -> None:
    """bf16 LM head weights through the CPU kernel where config.lm_head_dtype asks for it
    (auto: an NF4 float32 model on a CPU with the kernels; a dense model keeps the exact
    head its user chose); otherwise lm_head in `dtype`."""
    fits = kernel is not None and dtype == torch.float32 and model.arch.hidden_size % 16 == 0
    need = (f"a float32 model on a CPU with the CPU kernels and hidden_size % 16 == 0; this one is "
            f"{str(dtype).replace('torch.', '')}, hidden_size {model.arch.hidden_size}, "
            f"kernels {'loaded' if kernel else 'unavailable'}")
    if _wants_bf16("lm_head_dtype", config.lm_head_dtype, fits, need, config):
        model.set_lm_head_bf16(kernel)
        log.info("LM head: bfloat16 weights, float32 activations and sums (CPU kernel)")


def _lora_storage(model: LlamaForCausalLM, config: EngineConfig, kernel, dtype: torch.dtype) -> torch.dtype:
    """The adapters' slot dtype as config.lora_dtype asks (auto: bfloat16 for an NF4 float32
    model on a CPU with the kernels, where every LoRA linear's shapes fit the kernel's rows;
    otherwise the model dtype; float32 only for a float32 model)."""
    fits = kernel is not None and dtype == torch.float32 and all(
        m.in_features % 16 == 0 and m.out_features % 16 == 0 for m in model.lora_linears().values())
    need = (f"a float32 model on a CPU with the CPU kernels and every LoRA linear's sizes a multiple of 16; "
            f"this one is {str(dtype).replace('torch.', '')}, kernels {'loaded' if kernel else 'unavailable'}")
    if config.lora_dtype == "float32" and dtype != torch.float32:
        raise ModelLoadError("lora_dtype float32 needs a float32 model; this one is "
                             f"{str(dtype).replace('torch.', '')}")
    if _wants_bf16("lora_dtype", config.lora_dtype, fits, need, config):
        log.info("LoRA slots: bfloat16 A and B, float32 activations and sums (CPU kernel)")
        return torch.bfloat16
    return dtype


def _choose_attention(model: LlamaForCausalLM, kernel, dtype: torch.dtype) -> None:
    """Paged decode attention in place on the CPU kernel (float32, same maths as the torch
    path) where it can run; the torch path otherwise."""
    arch = model.arch
    if kernel is not None and dtype == torch.float32 and arch.head_dim % 16 == 0 \
            and arch.num_heads // arch.num_kv_heads <= 64:
        model.set_attention_kernel(kernel)


def resolve_model_dir(model: str) -> Path:
    """The HF folder behind `model`: "default", a folder, or a .gguf file (converted once)."""
    if model == "default":
        from server.model.default import ensure_default_model
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {path} is neither a folder of safetensors nor a .gguf file")
        return _converted_gguf(path)
    return path


def _converted_gguf(gguf: Path) -> Path:
    from server.model.default import cache_lock, convert_gguf

    stat = gguf.stat()
    root = Path(cache_dir())
    target = root / f"gguf-{_sha256(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)[:20]}"
    if (target / "config.json").is_file():
        return target
    with cache_lock(root, target.name):  # another process may be converting the same file
        if not (target / "config.json").is_file():
            convert_gguf(gguf, target)
    return target


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's SHA-256, computed once per (path, size, mtime) in this process."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    return digest.hexdigest()


def read_arch(folder: Path) -> LlamaArch:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json")
    cfg = _read_json(cfg_path)
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    return LlamaArch.from_config(cfg, gen, str(cfg_path))


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


class Checkpoint:
    """The tensors of a folder of safetensors files, by name; opens each file once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{index} has no weight_map")
            self.where = {name: folder / fname for name, fname in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"model folder {folder} has no *.safetensors weights")
            for path in files:
                for name in self._open(path).keys():
                    self.where[name] = path

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise ModelLoadError(f"weights file {path} is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"corrupt or unreadable safetensors file {path}: {e}") from e
        return self._handles[path]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name`, checked against the expected shape."""
        if name not in self.where:
            raise ModelLoadError(f"tensor {name} is missing from the weights in {self.folder}")
        path = self.where[name]
        try:
            t = self._open(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read tensor {name} from {path}: {e}") from e
        if tuple(t.shape) != tuple(shape):
            raise ModelLoadError(f"tensor {name} in {path} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()


# projections computed as one fused base matmul: (module, its parts in order)
FUSED = (("self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")))


def _load_linears(model: LlamaForCausalLM, ckpt: Checkpoint, quantization: str,
                  device: torch.device, dtype: torch.dtype) -> None:
    """Every LoRA linear's base. On the CPU, q/k/v and gate/up are quantized (or kept dense)
    as one fused matrix, which their layer runs as one matmul; each projection's base is a
    view of its rows (row_slice), so weights are held once."""
    linears = model.lora_linears()
    fuse = device.type == "cpu" and (quantization == "none" or model.arch.hidden_size % NF4_BLOCKSIZE == 0)
    done: set[str] = set()
    if fuse:
        for i, layer in enumerate(model.model.layers):
            for fused_name, parts in FUSED:
                names = [f"model.layers.{i}.{p}" for p in parts]
                weights = [_weight(linears[n], n, ckpt) for n in names]
                biases = [_bias(linears[n], n, ckpt) for n in names]
                bias = None if biases[0] is None else torch.cat(biases)
                fused = make_linear(torch.cat(weights), bias, quantization, device, dtype)  # (sum out, in)
                owner_name, _, leaf = fused_name.rpartition(".")
                setattr(layer.get_submodule(owner_name), leaf, fused)
                lo = 0
                for n, w in zip(names, weights):
                    linears[n].base = row_slice(fused, lo, lo + w.shape[0])
                    lo += w.shape[0]
                    done.add(n)
    for name, lin in linears.items():
        if name not in done:
            lin.base = make_linear(_weight(lin, name, ckpt), _bias(lin, name, ckpt), quantization, device, dtype)


def _weight(lin, name: str, ckpt: Checkpoint) -> torch.Tensor:
    return ckpt.get(f"{name}.weight", (lin.out_features, lin.in_features))


def _bias(lin, name: str, ckpt: Checkpoint) -> torch.Tensor | None:
    return ckpt.get(f"{name}.bias", (lin.out_features,)) if lin.base.bias is not None else None


def _load_dense(model: LlamaForCausalLM, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
    """Embeddings, norms and lm_head (tied to the embeddings when the config says so)."""
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue  # a linear's base, already loaded
        if name == "lm_head.weight" and model.arch.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        t = ckpt.get(name, tuple(param.shape)).to(device=device, dtype=dtype)
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left on the meta device"
