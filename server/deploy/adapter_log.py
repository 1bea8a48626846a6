"""AdapterLog: the admin loads and unloads of a replicated app, so every replica serves the same set.

The AppState deployment (app_state.py) holds, for each adapter name an admin loaded or
unloaded, its folder (None: unloaded) and the log version of that change. Every generation request carries the
version its ingress has seen (WireRequest.adapters_version); a replica behind it applies the
changes first (AdapterSync), so after a load or a reload returns, no replica takes a request
for that name on the old weights. Replicas also poll the log (every second), so a load reaches
every replica without waiting for its traffic, and one that starts later applies the whole log.
Adapters found in the shared adapters folder need no entry: every replica reads the same folder.

Limit: the log lives in its replica's memory. If that replica restarts, the admin loads made
through the API since the app started must be made again (folders in the adapters directory
are unaffected).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server.errors import AdapterError

log = logging.getLogger("loraplex.deploy")


@dataclass(frozen=True)
class LogState:
    version: int
    entries: dict[str, tuple[str | None, int]]     # name -> (folder or None = unloaded, version set)


class AdapterLog:
    """The log itself: record a change, read the whole state."""

    def __init__(self) -> None:
        self._version = 0
        self._entries: dict[str, tuple[str | None, int]] = {}

    def record(self, name: str, path: str | None) -> int:
        """name was loaded from path (None: unloaded) on one replica; -> the new version."""
        self._version += 1
        self._entries[name] = (path, self._version)
        return self._version

    def state(self) -> LogState:
        return LogState(self._version, dict(self._entries))


@dataclass
class AdapterSync:
    """A replica's side: which log changes it has applied, and applying the rest in order."""
    fetch: Callable[[], Awaitable[LogState]]                 # reads the log
    load: Callable[[str, str], Awaitable[None]]              # loads name from folder into this replica
    unload: Callable[[str], Awaitable[None]]
    version: int = 0
    applied: dict[str, int] = field(default_factory=dict)    # name -> version of the change applied
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def upto(self, version: int) -> None:
        """Apply every change up to at least `version` (no-op when already there)."""
        if version > self.version:
            await self.catch_up()

    async def catch_up(self) -> None:
        """Read the log and apply what changed since this replica last did (also polled)."""
        async with self._lock:
            state = await self.fetch()
            if state.version <= self.version:
                return
            for name, (path, changed) in sorted(state.entries.items(), key=lambda kv: kv[1][1]):
                if self.applied.get(name) == changed:
                    continue
                try:
                    if path is None:
                        await self.unload(name)
                    else:
                        await self.load(name, path)
                except AdapterError as e:    # e.g. unloading a name this replica never had
                    log.warning("adapter log change %d (%s) not applied here: %s", changed, name, e)
                self.applied[name] = changed
            self.version = state.version

    def mark(self, name: str, version: int) -> None:
        """This replica made change `version` itself (it is applied here already)."""
        self.applied[name] = version
