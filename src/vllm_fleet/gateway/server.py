"""Serving the gateway on a socket: the protocol-level relay of `relay/` (uvloop +
llhttp, no web framework), making the decisions of `core.py`."""

from __future__ import annotations

import ssl

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway.relay import RelayServer
from vllm_fleet.gateway.relay.state import Control
from vllm_fleet.registry import Registry


async def serve(
    config: FleetConfig,
    registry: Registry,
    host: str,
    port: int,
    control: Control | None = None,
    tls: ssl.SSLContext | None = None,
) -> RelayServer:
    """Start the gateway on host:port (OSError when the address is taken); stop it with
    `stop_accepting()`, then `close()`, which lets requests in flight finish first.
    `control`: what `POST /fleet/reload` reaches (None: that route answers 404); `tls`:
    serve HTTPS with this context (`gateway.tls.server_tls`)."""
    server = RelayServer(config, registry, control)
    await server.start(host, port, tls)
    return server
