"""Each Serve replica's inter-deployment gRPC server bound to the node's address, not every interface.

Ray Serve 2.60 binds it to "[::]:0" in `Replica._on_initialized`, while Ray's own processes
bind the node address. On a local start the node address is 127.0.0.1, so with this the whole
app stays on the loopback interface (tests/deploy checks every listening socket). Every module
that defines a deployment's class imports this one, so each replica process applies it when
it loads its class, before its replica initializes.
"""
from __future__ import annotations

import ray
from ray.serve._private import replica as _serve_replica

_ALL_INTERFACES = "[::]:"
_bind = _serve_replica.add_port_to_grpc_server


def _bind_node_address(server, address: str) -> int:
    if address.startswith(_ALL_INTERFACES):
        host = ray.util.get_node_ip_address()
        host = f"[{host}]" if ":" in host else host
        address = f"{host}:{address[len(_ALL_INTERFACES):]}"
    return _bind(server, address)


if getattr(_bind, "__module__", "") != __name__:
    _serve_replica.add_port_to_grpc_server = _bind_node_address
