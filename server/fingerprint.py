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
import logging
import os
from pathlib import Path

from safetensors import safe_open

from server.errors import ModelLoadError

log = logging.getLogger(__name__)
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


class BaseCheck:
    """Warns when an adapter records a base other than the served one. The served base is
    hashed once, on first need (reading it takes a while: call from a worker thread)."""

    def __init__(self, base_dir: str | os.PathLike | None) -> None:
        self.base_dir = base_dir          # None: nothing to check against
        self._hash: str | None = None

    def check(self, adapter_name: str, adapter_weights: str | Path) -> None:
        recorded = read_base_hash(adapter_weights)
        if recorded is None or self.base_dir is None:
            return
        if self._hash is None:
            try:
                self._hash = model_content_hash(self.base_dir)
            except (ModelLoadError, OSError) as e:
                log.warning("cannot hash the served base model to check adapter %r: %s", adapter_name, e)
                return
        if recorded != self._hash:
            log.warning("adapter %r was trained on a different base model (sha256 %s..., serving %s...): "
                        "its outputs may not match training", adapter_name, recorded[:12], self._hash[:12])
