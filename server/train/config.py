"""TrainConfig: everything one `loraplex train` run needs, validated once.

Target modules are named by their short aliases (q, k, v, o, gate, up, down), the same
seven decoder linears the server can serve LoRA on; `peft_targets` maps them to the
Llama module names PEFT matches.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.config import DEVICES, QUANTIZATIONS, ConfigError

TARGET_MODULES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}


@dataclass(frozen=True)
class TrainConfig:
    data: str                          # JSONL file of chat or prompt/completion examples
    out: str                           # adapter folder to write (PEFT layout)
    model: str = "default"             # an HF folder, or "default" (the embedded model)
    r: int = 16
    alpha: float = 0.0                 # 0 = 2 * r
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    epochs: int = 3
    lr: float = 2e-4
    batch: int = 4
    max_len: int = 512                 # examples are truncated to this many tokens
    seed: int = 0
    quantization: str = "nf4"          # nf4: QLoRA on the NF4 base the server uses; none: fp32 base
    device: str = "auto"               # auto = cuda when available, else cpu
    warmup: float = 0.1                # fraction of steps with a linear learning-rate ramp

    def __post_init__(self) -> None:
        for name in ("r", "epochs", "batch", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.alpha < 0:
            raise ConfigError(f"--alpha must be >= 0 (0 = 2 * r), got {self.alpha}")
        if not (0.0 < self.lr < 1.0):
            raise ConfigError(f"--lr must be in (0, 1), got {self.lr}")
        if not (0.0 <= self.warmup < 1.0):
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if not self.targets:
            raise ConfigError("--targets must name at least one module")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown:
            raise ConfigError(
                f"unknown --targets {unknown}; choose from {','.join(TARGET_MODULES)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--targets repeats a module: {','.join(self.targets)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {DEVICES}, got {self.device!r}")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha > 0 else 2.0 * self.r

    @property
    def peft_targets(self) -> list[str]:
        return [TARGET_MODULES[t] for t in self.targets]

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def as_record(self) -> dict:
        """The settings worth keeping beside the adapter (JSON-serialisable)."""
        return {
            "r": self.r, "alpha": self.lora_alpha, "targets": list(self.targets),
            "epochs": self.epochs, "lr": self.lr, "batch": self.batch, "max_len": self.max_len,
            "seed": self.seed, "quantization": self.quantization,
        }
