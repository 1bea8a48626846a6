"""Fault isolation for one engine step: a request's own failure fails that request alone.

Every stage of a step either works on one request at a time (grammar advance, closing
rule, detokenizing), where a guard around each request is enough, or on the whole batch
at once (grammar mask fill, forward, sampling). A batched stage that raises is run again
on parts of the batch until the requests whose own work fails are found; the others keep
the results they would have had alone. Nothing is retried when nothing fails, so isolation
costs one `try` per stage.

Failures that no request caused end the engine instead (EngineFatalError): out of memory,
a device error, or a forward that fails for every request of a batch on its own. The
server then reports itself unhealthy and exits, so a supervisor restarts it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from server.engine.request import Request
from server.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# RuntimeError texts of device-level failures (torch raises plain RuntimeErrors for these).
_DEVICE_MARKERS = ("CUDA error", "out of memory", "device-side assert", "CUBLAS_STATUS", "cuDNN error",
                   "HIP error", "illegal memory access")


class EngineFatalError(RuntimeError):
    """A failure no request caused (device error, out of memory): the engine must stop."""


def is_device_failure(e: BaseException) -> bool:
    """True for failures of the machine rather than of a request's own work."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _DEVICE_MARKERS)


def fatal_if_device(e: BaseException, stage: str) -> None:
    if is_device_failure(e):
        raise EngineFatalError(f"{stage}: {type(e).__name__}: {e}") from e


def describe(stage: str, e: BaseException) -> str:
    """The error a failed request ends with (engine-side; the API shows the client less)."""
    return f"{stage} failed: {e!r}"


def batched(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], stage: str
            ) -> tuple[list[R | None], dict[int, BaseException]]:
    """fn(items) -> one result per item; on failure, fn on halves until the failing items are found.

    Returns (results, failures): results[i] is None exactly for the indices in failures.
    A device-level failure is raised as EngineFatalError at once.
    """
    try:
        return list(fn(items)), {}
    except Exception as e:
        fatal_if_device(e, stage)
        first = e
    results: list[R | None] = [None] * len(items)
    failures: dict[int, BaseException] = {}
    _bisect(fn, items, list(range(len(items))), first, stage, results, failures)
    return results, failures


def _bisect(fn, items, idx: list[int], err: BaseException, stage: str, results: list, failures: dict) -> None:
    if len(idx) == 1:
        failures[idx[0]] = err
        return
    mid = len(idx) // 2
    for part in (idx[:mid], idx[mid:]):
        try:
            out = list(fn([items[i] for i in part]))
        except Exception as e:
            fatal_if_device(e, stage)
            _bisect(fn, items, part, e, stage, results, failures)
            continue
        for i, r in zip(part, out):
            results[i] = r


def forward(run: Callable[[SchedulerOutput], torch.Tensor], sched: SchedulerOutput
            ) -> tuple[SchedulerOutput, torch.Tensor | None, list[tuple[Request, BaseException]]]:
    """run(sched) -> logits (B, V); on failure, the batch is split until the culprits are found.

    Returns (the schedule of the requests that ran, their logits in that order, culprits).
    Re-running part of a batch rewrites the same KV slots with the same values, so the
    survivors' caches are as if the culprits had never been there. A batch of two or more
    in which every request fails alone is no request's fault: EngineFatalError.
    """
    try:
        return sched, run(sched), []
    except Exception as e:
        fatal_if_device(e, "forward")
        first = e
    rows = list(range(len(sched.requests)))
    results: list[torch.Tensor | None] = [None] * len(rows)
    failures: dict[int, BaseException] = {}
    _bisect(lambda part: list(run(_subset(sched, part)).unbind(0)), rows, rows, first, "forward",
            results, failures)
    if failures and len(failures) == len(rows) > 1:
        e = next(iter(failures.values()))
        raise EngineFatalError(f"forward fails for every request of the batch alone: {e!r}") from e
    culprits = [(sched.requests[i], e) for i, e in failures.items()]
    kept = [i for i in rows if i not in failures]
    for req, e in culprits:
        log.error("request %s: the forward fails with it in the batch: %r", req.request_id, e)
    if not kept:
        return _subset(sched, []), None, culprits
    return _subset(sched, kept), torch.stack([results[i] for i in kept]), culprits  # (B', V)


def _subset(sched: SchedulerOutput, rows: list[int]) -> SchedulerOutput:
    return SchedulerOutput(requests=[sched.requests[i] for i in rows], starts=[sched.starts[i] for i in rows],
                           num_new=[sched.num_new[i] for i in rows], sampled=[sched.sampled[i] for i in rows])
