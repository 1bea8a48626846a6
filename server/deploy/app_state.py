"""AppState: the app's one small shared deployment, the adapter log and the replicas' board.

A module of its own so that its replica process imports only these (not the engine or torch).
"""
from __future__ import annotations

from server.deploy import serve_patch  # noqa: F401  (before its replica initializes)
from server.deploy.adapter_log import AdapterLog
from server.deploy.replica_board import ReplicaBoard


class AppState(AdapterLog, ReplicaBoard):
    def __init__(self) -> None:
        AdapterLog.__init__(self)
        ReplicaBoard.__init__(self)
