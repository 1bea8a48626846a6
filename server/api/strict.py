"""The base of every request model (unknown fields ignored, wrong types refused: strict) and
the Unicode check every request body passes first."""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

_SURROGATE = re.compile("[\ud800-\udfff]")


def invalid_unicode_at(value: Any) -> str | None:
    """The path ("messages.0.content") of the first string (or key) holding a lone surrogate
    in a parsed JSON value, or None. One fast scan of the whole value first (the common case
    is clean); the walk that names the path is iterative, so any depth is safe."""
    try:
        if not _SURROGATE.search(json.dumps(value, ensure_ascii=False, check_circular=False)):
            return None
    except (TypeError, ValueError, RecursionError):
        pass                     # not plain JSON, or too deep to dump: walk it
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                key = str(k)
                where = f"{path}.{_printable(key)}" if path else _printable(key)
                if _SURROGATE.search(key):
                    return where
                stack.append((where, x))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
    return None


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")[:64]



class StrictModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
