"""LocalEngine: the EngineClient of this process, the Engine on its loop thread (AsyncEngine).

Each call runs where it must: generation streams come from AsyncEngine; adapter loads and
listings run in a worker thread (the store is thread-safe and reads disk); the snapshot is
read on the engine thread between steps, so a metrics scrape sees one consistent step.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.client import EngineSnapshot
from server.engine.engine import Engine
from server.engine.request import Request, RequestOutput
from server.lora.registry import AdapterInfo


LOCAL_REPLICA = "local"       # the replica name a single server's requests carry


class LocalEngine:
    def __init__(self, async_engine: AsyncEngine) -> None:
        self._loop = async_engine
        self._engine = async_engine.engine
        self._store = self._engine.store
        self.tokenizer = self._engine.tokenizer
        self.max_model_len: int = self._engine.max_model_len

    @staticmethod
    def start(config: EngineConfig) -> "LocalEngine":
        """Load the model and start the engine thread (blocking: call it in a worker thread)."""
        return LocalEngine(AsyncEngine(Engine(config)))

    def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        req.served_by = LOCAL_REPLICA
        return self._loop.generate(req)

    @property
    def is_alive(self) -> bool:
        return self._loop.is_alive

    @property
    def death(self) -> str | None:
        return self._loop.death

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._loop.shutdown)

    async def adapter_exists(self, name: str) -> bool:
        return await asyncio.to_thread(self._store.exists, name)

    async def adapter_infos(self) -> list[AdapterInfo]:
        return await asyncio.to_thread(self._store.list)

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(self._store.load, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._store.unload, name)

    async def snapshot(self) -> EngineSnapshot:
        return await self._loop.run_on_loop(self._engine.snapshot)

    async def reset_prefix_cache(self) -> int:
        return await self._loop.run_on_loop(self._engine.reset_prefix_cache)
