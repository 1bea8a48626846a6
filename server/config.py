"""Validated configuration: one dataclass per process role, passed whole.

EngineConfig is everything the engine (model, KV cache, scheduler, adapters) needs;
ServerConfig adds the HTTP side. Validation raises ConfigError with the offending value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

QUANTIZATIONS = ("nf4", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LM_HEAD_DTYPES = ("auto", "float32", "bfloat16")
LORA_DTYPES = ("auto", "float32", "bfloat16")
COMPILE_CHOICES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"            # a folder of HF safetensors, a .gguf file, or "default"
    quantization: str = "nf4"         # nf4: decoder linears in bitsandbytes NF4; none: 16/32-bit
    dtype: str = "auto"               # compute dtype; auto = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"              # auto = cuda when available, else cpu
    block_size: int = 16              # tokens per KV block
    num_kv_blocks: int = 0            # 0 = size the pool from kv_cache_tokens
    kv_cache_tokens: int = 32768      # KV pool size in tokens when num_kv_blocks is 0
    max_num_seqs: int = 32            # most sequences in one step
    max_num_batched_tokens: int = 2048  # most tokens (prefill + decode) in one step
    max_model_len: int = 0            # 0 = the model's context length
    adapters_dir: str = "adapters"
    max_loras: int = 8                # distinct adapters resident on the device (and per batch)
    max_lora_rank: int = 16
    max_cpu_loras: int = 64           # adapters kept in host memory
    lora_wait_steps: int = 8          # a waiting adapter is admitted within this many steps
    seed: int = 0
    # LM head weights read as: auto = bfloat16 for an NF4 float32 model where the project's
    # CPU kernels run (float32 activations and sums; half the bytes), else the model dtype
    lm_head_dtype: str = "auto"
    # adapters' A and B held and read as: auto = bfloat16 for an NF4 float32 model where the
    # CPU kernels run (float32 activations and sums; half the bytes), else the model dtype
    lora_dtype: str = "auto"
    enable_prefix_caching: bool = True   # reuse the KV blocks of a prompt prefix seen before
    prefix_cache_blocks: int = 0         # most cached blocks kept while unused (0 = as the pool allows)
    # on: decode steps run their layers torch.compile'd, compiled before the engine is ready
    # (server/model/compiled.py); off: the eager step; auto: on for CUDA, off on a CPU
    compile: str = "auto"

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.compile not in COMPILE_CHOICES:
            raise ConfigError(f"compile must be one of {COMPILE_CHOICES}, got {self.compile!r}")
        if self.lm_head_dtype not in LM_HEAD_DTYPES:
            raise ConfigError(f"lm_head_dtype must be one of {LM_HEAD_DTYPES}, got {self.lm_head_dtype!r}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ConfigError(f"lora_dtype must be one of {LORA_DTYPES}, got {self.lora_dtype!r}")
        for name in ("block_size", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens",
                     "max_loras", "max_lora_rank", "max_cpu_loras", "lora_wait_steps"):
            _positive(name, getattr(self, name))
        if self.prefix_cache_blocks < 0:
            raise ConfigError(f"prefix_cache_blocks must be >= 0, got {self.prefix_cache_blocks}")
        if self.num_kv_blocks < 0 or self.max_model_len < 0:
            raise ConfigError("num_kv_blocks and max_model_len must be >= 0")
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def compiles(self) -> bool:
        """Whether decode steps take the compiled layers (compile, with "auto" resolved)."""
        return self.compile == "on" or (self.compile == "auto" and self.resolved_device() == "cuda")

    def resolved_dtype(self) -> "torch.dtype":  # noqa: F821
        import torch
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device() == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str = ""                # path to the api-keys file; empty = open server
    max_queue: int = 256              # waiting requests beyond this get 429
    max_n: int = 8                    # largest `n` a request may ask for
    drain_timeout: float = 30.0       # seconds SIGTERM waits for in-flight requests
    max_request_bytes: int = 4 * 2**20  # larger request bodies get 413 before they are parsed
    request_timeout: float = 0.0      # seconds a generation request may take; 0 = no limit

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536):
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        _positive("max_queue", self.max_queue)
        _positive("max_n", self.max_n)
        if self.drain_timeout < 0:
            raise ConfigError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        _positive("max_request_bytes", self.max_request_bytes)
        if not (0 <= self.request_timeout < float("inf")):
            raise ConfigError(f"request_timeout must be >= 0 (0 = no limit), got {self.request_timeout}")
        if self.api_keys and not os.path.isfile(self.api_keys):
            raise ConfigError(f"api-keys file not found: {self.api_keys}")


def cache_dir() -> str:
    """Where fetched and converted models live: $LORAPLEX_CACHE or ~/.cache/loraplex."""
    return os.environ.get("LORAPLEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loraplex")
