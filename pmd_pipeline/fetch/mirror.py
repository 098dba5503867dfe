"""URL mirrors: rewrite `https://host/path` to `{mirror}/host/path`, and a small static server to be one
(with HTTP Range, so a download from it resumes like one from the source's own server)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


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


class RangeHandler(SimpleHTTPRequestHandler):
    """The stdlib's static handler, quiet, plus single byte ranges (`Range: bytes=N-` or `bytes=N-M`, answered
    206 with Content-Range, or 416 past the end) and `If-Range` on its ETag or Last-Modified. Other range forms
    get the whole file (200), as RFC 9110 allows."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def send_head(self):
        self.byte_range: tuple[int, int] | None = None  # (first, last) of the 206 being sent
        path = self.translate_path(self.path)
        wanted = _RANGE.fullmatch((self.headers.get("Range") or "").strip())
        if self.command != "GET" or not wanted or not os.path.isfile(path):
            return super().send_head()
        f = open(path, "rb")  # noqa: SIM115 - handed to copyfile, closed by the stdlib's do_GET
        try:
            st = os.fstat(f.fileno())
            etag, modified = f'"{st.st_size:x}-{st.st_mtime_ns:x}"', self.date_time_string(st.st_mtime)
            if_range = self.headers.get("If-Range")
            if if_range is not None and if_range.strip() not in (etag, modified):
                f.close()
                return super().send_head()  # the file changed since the client's copy began: all of it
            first, size = int(wanted[1]), st.st_size
            last = min(int(wanted[2]), size - 1) if wanted[2] else size - 1
            if first >= size or last < first:
                f.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
            self.end_headers()
            f.seek(first)
            self.byte_range = (first, last)
            return f
        except BaseException:
            f.close()
            raise

    def copyfile(self, source, outputfile) -> None:
        if self.byte_range is None:
            shutil.copyfileobj(source, outputfile)
            return
        left = self.byte_range[1] - self.byte_range[0] + 1
        while left > 0:
            chunk = source.read(min(left, 1 << 16))
            if not chunk:
                return
            outputfile.write(chunk)
            left -= len(chunk)


class StaticServer:
    """Serve a folder on 127.0.0.1 (an ephemeral port) from a daemon thread, as a context manager.

    `handler`: a RangeHandler subclass (the tests' one injects faults)."""

    def __init__(self, root: Path, port: int = 0, handler=RangeHandler):
        handler = functools.partial(handler, directory=str(root))
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
