"""The gateway's server: a protocol-level HTTP/1.1 relay on asyncio + llhttp.

No web framework on the proxied path: `client.py` parses client requests with
httptools.HttpRequestParser, `exchange.py` relays one request, `upstream.py` pools
keep-alive engine connections parsed with httptools.HttpResponseParser, `wire.py`
writes heads. Every decision (auth, routing, rewrite, replica, errors) is `core.Core`'s.
"""

from vllm_fleet.gateway.relay.server import FastServer

__all__ = ["FastServer"]
