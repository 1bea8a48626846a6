"""AdapterLog and AdapterSync: a replica applies every admin change, in order, once."""
from __future__ import annotations

import asyncio

from server.deploy.adapter_log import AdapterLog, AdapterSync
from server.errors import AdapterError


class FakeStore:
    """What a replica's engine does with each change (the calls, in order)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def load(self, name: str, path: str) -> None:
        self.calls.append(("load", name, path))

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        if name == "never-here":
            raise AdapterError(f"unknown adapter {name!r}")


def _sync(log: AdapterLog, store: FakeStore) -> AdapterSync:
    async def fetch():
        return log.state()
    return AdapterSync(fetch, store.load, store.unload)


def test_a_late_replica_applies_the_current_state_not_the_history():
    log = AdapterLog()
    assert log.record("a", "/ad/a1") == 1
    log.record("b", "/ad/b")
    log.record("a", None)           # a reload: unloaded, then loaded from new weights
    log.record("a", "/ad/a2")
    log.record("never-here", None)
    store = FakeStore()
    sync = _sync(log, store)
    asyncio.run(sync.upto(5))
    assert store.calls == [("load", "b", "/ad/b"), ("load", "a", "/ad/a2"), ("unload", "never-here")]
    assert sync.version == 5
    asyncio.run(sync.upto(5))       # caught up: nothing again
    asyncio.run(sync.catch_up())
    assert len(store.calls) == 3


def test_changes_a_replica_made_itself_are_not_applied_twice():
    log = AdapterLog()
    store = FakeStore()
    sync = _sync(log, store)
    v = log.record("mine", "/ad/mine")      # this replica loaded it, then logged it
    sync.mark("mine", v)
    log.record("theirs", "/ad/theirs")      # another replica's change
    asyncio.run(sync.upto(2))
    assert store.calls == [("load", "theirs", "/ad/theirs")]
    log.record("mine", "/ad/mine-v2")       # someone reloads it: applied here too
    asyncio.run(sync.catch_up())
    assert store.calls[-1] == ("load", "mine", "/ad/mine-v2") and sync.version == 3


def test_a_request_older_than_what_the_replica_has_applied_reads_nothing():
    log = AdapterLog()
    log.record("a", "/ad/a")
    reads = []

    async def fetch():
        reads.append(1)
        return log.state()
    store = FakeStore()
    sync = AdapterSync(fetch, store.load, store.unload)
    asyncio.run(sync.upto(1))
    asyncio.run(sync.upto(0))
    asyncio.run(sync.upto(1))
    assert len(reads) == 1
