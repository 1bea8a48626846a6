"""AdapterRegistry: adapter names -> entries, discovered in adapters_dir or registered by path.

Names are `[A-Za-z0-9._-]{1,128}`, never "." or "..". A name found in adapters_dir must
resolve (symlinks followed) to a folder directly inside adapters_dir; one whose real path
escapes the root is not an adapter. A name unloaded by the admin API is not rediscovered
until it is registered again. The registry holds no lock: AdapterStore calls it under its own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from server.errors import AdapterError
from server.lora.adapter import CONFIG_FILE, LoraAdapter

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass
class AdapterInfo:
    name: str
    rank: int | None            # None until the adapter has been read once
    alpha: float | None
    targets: tuple[str, ...]
    tier: str                   # "disk" | "host" | "device"
    requests_served: int
    last_used: float | None     # time.time() of the last request, None if never
    identity: str | None


@dataclass
class Entry:
    name: str
    path: str
    adapter: LoraAdapter | None = None    # host copy (weights in the serving dtype)
    meta: LoraAdapter | None = None       # last read adapter (its weights may have left the host cache)
    loading: bool = False
    error: AdapterError | None = None
    slot: int | None = None               # device slot holding meta.identity
    retired: list[int] = field(default_factory=list)  # slots with older weights, pinned by running requests
    pins: int = 0
    unloading: bool = False
    served: int = 0
    last_used: float | None = None
    generation: int = 0                   # bumped by load/unload: a read started before is discarded
    install: int = 0                      # the store's serial of meta's install (prefix-cache keys)


def valid_name(name: str) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and name not in (".", "..")


def resolve_within(root: str, path: str) -> str | None:
    """`path` (absolute, or relative to the working directory) with symlinks resolved, if that
    lies inside the folder `root` (not root itself); None when it escapes it."""
    root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real if real != root and os.path.commonpath([real, root]) == root else None


def check_name(name: str) -> None:
    if not valid_name(name):
        raise AdapterError(f"invalid adapter name {name!r}: use 1-128 of A-Z a-z 0-9 . _ -")


class AdapterRegistry:
    def __init__(self, adapters_dir: str) -> None:
        self.root = os.path.realpath(adapters_dir)
        self.entries: dict[str, Entry] = {}
        self.unloaded: set[str] = set()

    def find(self, name: str) -> Entry | None:
        """The entry for `name`, registering adapters_dir/name on first sight."""
        entry = self.entries.get(name)
        if entry is not None or not valid_name(name) or name in self.unloaded:
            return entry
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.dirname(path) != self.root or not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            return None   # absent, or a symlink escaping the adapters root
        entry = self.entries[name] = Entry(name, path)
        return entry

    def live(self, name: str) -> Entry:
        """The entry new requests may use, or AdapterError("unknown adapter ...")."""
        entry = self.find(name)
        if entry is None or entry.unloading:
            raise AdapterError(f"unknown adapter {name!r}")
        return entry

    def scan(self) -> None:
        if os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                self.find(name)

    def register(self, name: str, path: str) -> Entry:
        """(Re-)register `name` at `path` (an admin load)."""
        self.unloaded.discard(name)
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = Entry(name, path)
        entry.path, entry.unloading, entry.error, entry.loading = path, False, None, False
        entry.generation += 1
        return entry

    def mark_unloaded(self, name: str) -> Entry:
        entry = self.live(name)
        entry.unloading = True
        entry.generation += 1
        self.unloaded.add(name)
        return entry
