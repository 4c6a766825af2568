"""The gateway's server: a protocol-level HTTP/1.1 relay on asyncio + llhttp.

No web framework on the proxied path. The modules, each importing only those before it:
`wire.py` writes heads, `request.py` is a client request as parsed, `upstream.py` pools
keep-alive engine connections parsed with httptools.HttpResponseParser, `exchange.py`
relays one request, `client.py` parses client requests with httptools.HttpRequestParser,
`server.py` listens, sweeps and closes. `state.py` (what the server and its connections
share), `admission.py` (pacing) and `linger.py` (the lingering close after an early
answer) import nothing else from here. Every decision (auth, routing, rewrite, replica,
errors) is `core.Core`'s.
"""

from vllm_fleet.gateway.relay.server import RelayServer

__all__ = ["RelayServer"]
