"""/v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM-compatible bodies), /v1/adapters,
/reset_prefix_cache (vLLM's path).

Loading and unloading need an admin key (or an open server). Names are path components
(no "/", no ".."); the base model's ids are reserved. A `lora_path` (absolute, or relative
to the server's working directory) must resolve (symlinks followed) to a folder inside it: a path that
escapes the adapters folder is refused, whoever asks.
"""
from __future__ import annotations

import dataclasses
import os
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api import errors
from server.api.protocol import LoadAdapterRequest, UnloadAdapterRequest
from server.api.state import ServerState, valid_adapter_name
from server.lora.registry import resolve_within

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _check_name(state: ServerState, name: str) -> None:
    if not valid_adapter_name(name):
        raise errors.invalid(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' "
                             "(1 to 128 of them; not '.' or '..')", "lora_name", "invalid_adapter_name")
    if state.is_base(name):
        raise errors.invalid(f"{name!r} is the base model's id and cannot name an adapter",
                             "lora_name", "invalid_adapter_name")


@router.post("/v1/load_lora_adapter")
async def load_adapter(body: LoadAdapterRequest, request: Request):
    state = _state(request)
    state.require_admin(request)
    state.require_ready()
    _check_name(state, body.lora_name)
    path = resolve_within(state.cfg.engine.adapters_dir, body.lora_path)
    if path is None:
        raise errors.invalid(f"adapter path {body.lora_path!r} is outside the adapters folder", "lora_path",
                             "adapter_path_outside_root")
    if not os.path.isdir(path):
        raise errors.APIError(404, f"adapter path not found: {body.lora_path}", "invalid_request_error",
                              "lora_path", "adapter_path_not_found")
    if await state.engine.adapter_exists(body.lora_name):
        raise errors.invalid(f"adapter {body.lora_name!r} is already loaded; unload it first",
                             "lora_name", "adapter_exists")
    start = time.monotonic()
    try:
        await state.engine.load_adapter(body.lora_name, path)
    except Exception:
        state.metrics.adapter_admin.labels("load", "error").inc()
        raise
    state.metrics.adapter_admin.labels("load", "ok").inc()
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully "
                             f"in {time.monotonic() - start:.3f} s.")


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapterRequest, request: Request):
    state = _state(request)
    state.require_admin(request)
    state.require_ready()
    if not valid_adapter_name(body.lora_name) or not await state.engine.adapter_exists(body.lora_name):
        raise errors.APIError(404, f"adapter {body.lora_name!r} is not loaded", "invalid_request_error",
                              "lora_name", "model_not_found")
    try:
        await state.engine.unload_adapter(body.lora_name)
    except Exception:
        state.metrics.adapter_admin.labels("unload", "error").inc()
        raise
    state.metrics.adapter_admin.labels("unload", "ok").inc()
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    """The adapters this caller may use, with the store's bookkeeping (rank, tier, use counts)."""
    state = _state(request)
    who = state.principal(request)
    state.require_ready()
    rows = [dataclasses.asdict(info) for info in await state.engine.adapter_infos() if who.may_use(info.name)]
    return JSONResponse({"object": "list", "data": rows})


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request):
    """Empty the prefix cache (admin): blocks in use stay with their requests, nothing else is kept."""
    state = _state(request)
    state.require_admin(request)
    engine = state.require_ready()
    dropped = await engine.reset_prefix_cache()
    return JSONResponse({"object": "prefix_cache.reset", "blocks_dropped": dropped})
