"""Fingerprint: the content hash of a base model, and the one an adapter records.

`loraplex train` writes the hash of the base it trained on into the header metadata of
adapter_model.safetensors (`loraplex_base_sha256`, a str -> str map PEFT ignores), so the
server can warn when an adapter is served on a different base.

model_content_hash is SHA-256 over the bytes of every *.safetensors file of the model
folder, in sorted file-name order; the quantization does not enter it (the NF4 weights are
a deterministic function of these bytes).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors import safe_open

from server.errors import ModelLoadError

BASE_SHA256 = "loraplex_base_sha256"
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


def read_base_hash(adapter_weights: str | Path) -> str | None:
    """The base-model hash recorded in an adapter_model.safetensors, or None if absent."""
    with safe_open(str(adapter_weights), framework="pt") as f:
        return (f.metadata() or {}).get(BASE_SHA256)
