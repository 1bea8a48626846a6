"""ModelMap: scenario adapter labels -> what the target server needs in the request body.

A map file (YAML or JSON) is a mapping from label to an entry; an entry is either the
`model` string, or {model: ..., body: {...}} where body fields are merged into the
request (llama.cpp's server selects adapters with "lora": [{"id": 0, "scale": 1.0}]).
The key "*" is the fallback for labels not listed; "{name}" in its model is replaced by
the label. Without a map every label is sent as `model` unchanged.

    base: SmolLM2-135M-Instruct
    a1: {model: smollm2, body: {lora: [{id: 0, scale: 1.0}]}}
    "*": {model: "{name}"}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml


class ModelMapError(ValueError):
    """A model map file is missing, malformed, or lacks an entry for a label."""


@dataclass(frozen=True)
class Target:
    model: str
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelMap:
    entries: dict[str, Target] = field(default_factory=dict)
    source: str = ""                  # the file it came from; "" = identity map

    def resolve(self, label: str) -> Target:
        if not self.entries:
            return Target(model=label)
        if label in self.entries:
            return self.entries[label]
        if "*" in self.entries:
            t = self.entries["*"]
            return Target(model=t.model.replace("{name}", label), body=t.body)
        raise ModelMapError(f"model map {self.source} has no entry for {label!r} and no '*' fallback")


def load_model_map(path: str | None) -> ModelMap:
    if not path:
        return ModelMap()
    if not os.path.isfile(path):
        bundled = os.path.join(os.path.dirname(__file__), "maps", os.path.basename(path))
        if not os.path.isfile(bundled):
            raise ModelMapError(f"model map file not found: {path}")
        path = bundled
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ModelMapError(f"{path}: cannot parse: {e}") from e
    return parse_model_map(raw, path)


def parse_model_map(raw: Any, source: str = "<map>") -> ModelMap:
    if not isinstance(raw, dict) or not raw:
        raise ModelMapError(f"{source}: a model map must be a non-empty mapping, got {raw!r}")
    entries = {}
    for label, v in raw.items():
        if isinstance(v, str):
            entries[str(label)] = Target(model=v)
            continue
        if not isinstance(v, dict) or not isinstance(v.get("model"), str):
            raise ModelMapError(f"{source}: entry {label!r} must be a model name or {{model: str, body: {{...}}}}, got {v!r}")
        unknown = sorted(set(v) - {"model", "body"})
        body = v.get("body", {})
        if unknown or not isinstance(body, dict):
            raise ModelMapError(f"{source}: entry {label!r}: unknown keys {unknown} or body not a mapping")
        if {"model", "messages", "stream"} & set(body):
            raise ModelMapError(f"{source}: entry {label!r}: body may not override model, messages or stream")
        entries[str(label)] = Target(model=v["model"], body=dict(body))
    return ModelMap(entries=entries, source=source)
