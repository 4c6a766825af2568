"""The status page's files (`gateway/page/`: HTML, CSS, JavaScript, shipped inside the
package), answered at `GET /fleet/` and `GET /fleet/assets/{file}`.

Read once from the package and kept in memory (they are a few tens of kB). The page holds
no data and needs no key: it reads `/fleet/overview` with the key the person signs in
with. Its Content-Security-Policy lets it load only its own files and talk only to this
gateway, and no other site may frame it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from vllm_fleet.gateway.errors import Reply, error_reply

PAGE_PATHS = frozenset({"/fleet", "/fleet/"})
ASSETS_PREFIX = "/fleet/assets/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
_SECURITY = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


@cache
def _files() -> dict[str, bytes]:
    """Every file of gateway/page/, by name, read once (a request never reaches the disk)."""
    folder = resources.files("vllm_fleet.gateway").joinpath("page")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".")
    }


def page_reply(path: str) -> Reply:
    """The answer to GET of `/fleet`, `/fleet/` or `/fleet/assets/{file}`."""
    if path == "/fleet":  # relative asset URLs need the trailing slash
        return Reply(308, b"", "text/plain; charset=utf-8", (("Location", "/fleet/"),))
    name = "index.html" if path == "/fleet/" else path.removeprefix(ASSETS_PREFIX)
    body = _files().get(name)
    suffix = name[name.rfind(".") :] if "." in name else ""
    if body is None or suffix not in _TYPES:
        return error_reply(404, f"no such file of the status page: `{path}`", "not_found")
    return Reply(200, body, _TYPES[suffix], _SECURITY)


def is_page_path(path: str) -> bool:
    return path in PAGE_PATHS or path.startswith(ASSETS_PREFIX)
