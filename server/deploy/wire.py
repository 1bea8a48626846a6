"""WireRequest: an engine Request as it crosses from the ingress to a remote engine replica.

A Request holds its constraint as a live matcher (llguidance state, not picklable) and its
deadline on this process's monotonic clock. On the wire it carries the constraint's spec and
closing budget instead (the replica compiles the spec with its own compiler, cached, and
starts a fresh matcher: the same grammar at the same start), and the seconds left before
its deadline. It also carries the adapter-log version the ingress has seen, so the replica
applies every admin load and unload up to it before taking the request (adapter_log.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from server.engine.request import Request
from server.structured.grammar import CompiledGrammar, new_matcher
from server.structured.spec import ConstraintSpec


@dataclass(frozen=True)
class WireRequest:
    request: Request                     # constraint None, deadline None (see below)
    spec: ConstraintSpec | None          # the constraint's spec; None = unconstrained
    close_within: int | None             # the constraint's resolved closing budget
    seconds_left: float | None           # until the request's deadline, at send time
    adapters_version: int                # the adapter log's version the ingress has seen

    @staticmethod
    def of(req: Request, adapters_version: int) -> "WireRequest":
        m = req.constraint
        spec = getattr(m, "spec", None) if m is not None else None
        if m is not None and spec is None:
            raise TypeError("a constraint without its spec cannot be sent to a replica")
        left = None if req.deadline is None else req.deadline - time.monotonic()
        bare = dataclasses.replace(req, constraint=None, deadline=None)
        return WireRequest(bare, spec, None if m is None else m.close_within, left, adapters_version)

    def to_request(self, compiled: CompiledGrammar | None) -> Request:
        """The Request on the replica's side: compiled is self.spec compiled there (None if no spec)."""
        now = time.monotonic()
        constraint = None if compiled is None else new_matcher(compiled, self.close_within)
        deadline = None if self.seconds_left is None else now + self.seconds_left
        return dataclasses.replace(self.request, constraint=constraint, deadline=deadline, arrival=now)
