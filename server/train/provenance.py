"""Provenance: which base model an adapter was trained on, recorded in its weights file.

The record lives in the safetensors header metadata of adapter_model.safetensors (a
str -> str map that PEFT ignores when loading), so it travels with the weights:

    "loraplex_base_sha256"   model_content_hash() of the base folder (64 hex digits)
    "loraplex_base_model"    the --model value given to `loraplex train` ("default" or a path)
    "loraplex_train"         JSON of the training settings (TrainConfig.as_record())

model_content_hash and read_base_hash live in server/fingerprint.py: the server
computes the same hash of the base it serves and warns when an adapter's recorded hash differs.
"""
from __future__ import annotations

import json

from server.fingerprint import BASE_SHA256

BASE_MODEL = "loraplex_base_model"
TRAIN_SETTINGS = "loraplex_train"


def provenance_metadata(base_hash: str, base_model: str, settings: dict) -> dict[str, str]:
    """The safetensors metadata entries recording an adapter's base and training."""
    return {
        "format": "pt",
        BASE_SHA256: base_hash,
        BASE_MODEL: base_model,
        TRAIN_SETTINGS: json.dumps(settings, sort_keys=True),
    }
