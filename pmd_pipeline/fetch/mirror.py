"""URL mirrors: rewrite `https://host/path` to `{mirror}/host/path`, and a small static server to be one."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def use_mirror(fetch, mirror_url: str) -> None:
    """Fetch through `mirror_url`, and allow its host and port (that port only) though it is a local address."""
    fetch.mirror = mirror_url
    parts = urlsplit(mirror_url)
    host = (parts.hostname or "").lower()
    if not host:
        return
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    entry = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if entry not in fetch.allowed_private_hosts:
        fetch.allowed_private_hosts.append(entry)


def rewrite_url(url: str, mirror: str) -> str:
    """With a mirror, the scheme and host become a path under it (internal caches use the same layout)."""
    if not mirror:
        return url
    for scheme in ("https://", "http://"):
        if url.startswith(scheme):
            return f"{mirror.rstrip('/')}/{url[len(scheme) :]}"
    return url


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


class StaticServer:
    """Serve a folder on 127.0.0.1 (an ephemeral port) from a daemon thread, as a context manager."""

    def __init__(self, root: Path, port: int = 0):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StaticServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
