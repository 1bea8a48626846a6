"""Provenance: which base model an adapter was trained on, recorded in its weights file.

The record lives in the safetensors header metadata of adapter_model.safetensors (a
str -> str map that PEFT ignores when loading), so it travels with the weights:

    "loraplex_base_sha256"   model_content_hash() of the base folder (64 hex digits)
    "loraplex_base_model"    the --model value given to `loraplex train` ("default" or a path)
    "loraplex_train"         JSON of the training settings (TrainConfig.as_record())

model_content_hash is SHA-256 over the bytes of every *.safetensors file in the model
folder, in sorted file-name order; the quantization does not enter it (the NF4 weights are
a deterministic function of these bytes). A server that loads the same folder computes
the same hash and may warn when an adapter's recorded hash differs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from server.errors import ModelLoadError

BASE_SHA256 = "loraplex_base_sha256"
BASE_MODEL = "loraplex_base_model"
TRAIN_SETTINGS = "loraplex_train"
_CHUNK = 1 << 22


def model_content_hash(folder: str | Path) -> str:
    """SHA-256 (hex) over the model folder's *.safetensors files, sorted by name."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in model folder {str(folder)!r}")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def provenance_metadata(base_hash: str, base_model: str, settings: dict) -> dict[str, str]:
    """The safetensors metadata entries recording an adapter's base and training."""
    return {
        "format": "pt",
        BASE_SHA256: base_hash,
        BASE_MODEL: base_model,
        TRAIN_SETTINGS: json.dumps(settings, sort_keys=True),
    }


def read_base_hash(adapter_weights: str | Path) -> str | None:
    """The recorded base-model hash of an adapter_model.safetensors, or None if absent."""
    with safe_open(str(adapter_weights), framework="pt") as f:
        return (f.metadata() or {}).get(BASE_SHA256)
