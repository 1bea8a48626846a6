"""API keys, tenants and adapter access.

The keys file (JSON, or YAML of the same shape) lists every key:

    {"keys": [{"key": "sk-...", "tenant": "acme", "adapters": ["acme-*", "shared"], "admin": false,
               "cache_namespace": "public"}]}

`adapters` are fnmatch globs over adapter names. The base model is open to every key;
only `admin` keys may load and unload adapters. Without a keys file the server is open:
every caller is an admin that may use every adapter.
Prefix caching is per tenant: a tenant's cached prompt blocks are found only by its own
requests (so no tenant can time another's prompts). Keys that name the same optional
`cache_namespace` share one cache namespace instead (e.g. public system prompts).
Keys are compared in constant time against every entry (no early exit on a match).
"""
from __future__ import annotations

import fnmatch
import hmac
import json
import os
from dataclasses import dataclass

from server.config import ConfigError


@dataclass(frozen=True)
class Principal:
    tenant: str
    adapters: tuple[str, ...]     # globs; ("*",) = every adapter
    admin: bool
    cache_namespace: str | None = None   # shared prefix-cache namespace; None = the tenant's own

    @property
    def cache_scope(self) -> str:
        """The prefix-cache namespace of this caller's requests."""
        return f"tenant:{self.tenant}" if self.cache_namespace is None else f"shared:{self.cache_namespace}"

    def may_use(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)


OPEN = Principal(tenant="open", adapters=("*",), admin=True)


@dataclass(frozen=True)
class _Entry:
    key: bytes
    principal: Principal


class KeyTable:
    """The parsed keys file; `authenticate` maps a bearer token to its Principal or None."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    @property
    def open(self) -> bool:
        return not self._entries

    @staticmethod
    def empty() -> "KeyTable":
        return KeyTable([])

    @staticmethod
    def from_file(path: str) -> "KeyTable":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read api-keys file {path}: {e}") from e
        data = _parse(text, path)
        return KeyTable(_entries(data, path))

    def authenticate(self, token: str | None) -> Principal | None:
        if self.open:
            return OPEN
        if not token:
            return None
        given = token.encode("utf-8")
        found: Principal | None = None
        for entry in self._entries:  # compare with every key: time does not depend on which matched
            if hmac.compare_digest(given, entry.key):
                found = entry.principal
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _parse(text: str, path: str) -> object:
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
        import yaml
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"api-keys file {path} is not valid YAML: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"api-keys file {path} is not valid JSON: {e}") from e


def _entries(data: object, path: str) -> list[_Entry]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise ConfigError(f"api-keys file {path} must be an object with a non-empty list 'keys'")
    entries: list[_Entry] = []
    seen: set[str] = set()
    for i, item in enumerate(data["keys"]):
        if not isinstance(item, dict):
            raise ConfigError(f"api-keys file {path}: keys[{i}] must be an object, got {item!r}")
        key, tenant = item.get("key"), item.get("tenant")
        adapters, admin = item.get("adapters", []), item.get("admin", False)
        namespace = item.get("cache_namespace")
        if not isinstance(key, str) or len(key) < 8:
            raise ConfigError(f"api-keys file {path}: keys[{i}].key must be a string of >= 8 characters")
        if key in seen:
            raise ConfigError(f"api-keys file {path}: keys[{i}].key is listed twice")
        if not isinstance(tenant, str) or not tenant:
            raise ConfigError(f"api-keys file {path}: keys[{i}].tenant must be a non-empty string, got {tenant!r}")
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise ConfigError(f"api-keys file {path}: keys[{i}].adapters must be a list of strings, got {adapters!r}")
        if not isinstance(admin, bool):
            raise ConfigError(f"api-keys file {path}: keys[{i}].admin must be true or false, got {admin!r}")
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise ConfigError(f"api-keys file {path}: keys[{i}].cache_namespace must be a non-empty string, "
                              f"got {namespace!r}")
        seen.add(key)
        entries.append(_Entry(key.encode("utf-8"), Principal(tenant, tuple(adapters), admin, namespace)))
    return entries
