"""EngineClient: the one seam between the HTTP layer and an engine.

The API submits fully built engine Requests and reads their outputs as an async stream;
leaving the stream early aborts the request. It loads, unloads and lists adapters, and
reads an EngineSnapshot for /metrics. It needs the tokenizer (templating and tokenizing
happen before submit) and the context length. The thread-and-queue engine of this process
(server/engine/local.py) is one implementation; a remote replica can be another without
touching server/api/.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from server.engine.request import Request, RequestOutput

if TYPE_CHECKING:
    from server.lora.registry import AdapterInfo
    from server.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine and adapter-store state at one instant (read on the engine thread, between steps)."""
    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    max_loras: int = 0
    device_slots_used: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    preemptions: int = 0
    adapter_counters: dict[str, float] = field(default_factory=dict)  # loads, evictions, hits, ...
    # prefix cache, cumulative by adapter ("" = base): prompt tokens looked up, tokens found
    prefix_cache_queries: dict[str, int] = field(default_factory=dict)
    prefix_cache_hits: dict[str, int] = field(default_factory=dict)
    kv_blocks_cached: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineClient(Protocol):
    tokenizer: "Tokenizer"
    max_model_len: int            # the longest prompt + output a request may reach

    def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Submit req; its outputs (deltas) until the finished one. add errors (unknown
        adapter, prompt too long, ...) are raised before anything is yielded."""
        ...

    async def adapter_exists(self, name: str) -> bool: ...
    async def adapter_infos(self) -> list["AdapterInfo"]: ...
    async def load_adapter(self, name: str, path: str) -> None: ...
    async def unload_adapter(self, name: str) -> None: ...
    async def snapshot(self) -> EngineSnapshot: ...
    async def reset_prefix_cache(self) -> int: ...   # -> blocks dropped

    @property
    def is_alive(self) -> bool: ...

    @property
    def death(self) -> str | None:
        """Why the engine stopped on its own (None while it serves)."""
        ...

    async def shutdown(self) -> None: ...
