"""Export: write a trained adapter in the PEFT layout, atomically.

    OUT/adapter_config.json          PEFT's LoraConfig
    OUT/adapter_model.safetensors    LoRA A/B tensors (fp32) + provenance metadata

Both files are written into a temporary folder beside OUT first. A new OUT is that
folder renamed; an existing OUT (which may hold the dataset and a README) has each file
replaced by rename, so readers never see a half-written file.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from server.errors import LoraplexError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterExportError(LoraplexError):
    """The adapter folder cannot be written."""


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give it and its files the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in ADAPTER_FILES:
        os.chmod(folder / name, 0o666 & ~umask)


def save_adapter(peft_model: nn.Module, out: str | Path, base_model: str, metadata: dict[str, str]) -> Path:
    """Write peft_model's LoRA weights and config to out; returns out.

    base_model is recorded as the config's base_model_name_or_path (the --model value, e.g.
    "default", rather than a machine-specific cache path).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterExportError(f"--out {str(out)!r} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(peft_model).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata=metadata)
        config = copy.deepcopy(peft_model.peft_config["default"])
        config.inference_mode = True
        config.base_model_name_or_path = base_model
        config.target_modules = sorted(config.target_modules)  # PEFT keeps a set: fix the order
        config.save_pretrained(str(tmp))
        _default_permissions(tmp)
        if not out.exists():
            os.replace(tmp, out)
        else:
            for name in ADAPTER_FILES:
                os.replace(tmp / name, out / name)
    except OSError as e:
        raise AdapterExportError(f"cannot write the adapter to {str(out)!r}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
