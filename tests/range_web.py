"""A real threaded HTTP server on 127.0.0.1 for the download tests: the project's mirror server (StaticServer,
with HTTP Range) over a folder, plus faults a test sets per path, and a log of every request it answered."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from pmd_pipeline.fetch.mirror import RangeHandler, StaticServer


class Faults:
    """What the server does wrong, per URL path, and what it saw; shared by its handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str | None]] = []  # (path, its Range header), in arrival order
        self.drop_after: dict[str, int] = {}  # path -> close the connection after this many body bytes (once)
        self.ignore_range: set[str] = set()  # paths answered 200, whole, whatever the Range
        self.seconds_per_chunk: dict[str, float] = {}  # path -> a pause after every 64 KiB (a slow link)
        self.active = 0
        self.most_active = 0  # the most requests in flight at once

    def hits(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p == path)

    def ranges(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for p, r in self.requests if p == path]

    def counts(self) -> Counter:
        with self.lock:
            return Counter(p for p, _ in self.requests)


class FaultyHandler(RangeHandler):
    def __init__(self, *args, faults: Faults, **kwargs):
        self.faults = faults
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        with self.faults.lock:
            self.faults.requests.append((path, self.headers.get("Range")))
            self.faults.active += 1
            self.faults.most_active = max(self.faults.most_active, self.faults.active)
            drop = self.faults.drop_after.pop(path, None)
            ignore = path in self.faults.ignore_range
        self.url_path, self.drop, self.pause = path, drop, self.faults.seconds_per_chunk.get(path, 0.0)
        if ignore:
            del self.headers["Range"]
        try:
            super().do_GET()
        finally:
            with self.faults.lock:
                self.faults.active -= 1

    def copyfile(self, source, outputfile) -> None:
        left = None if self.byte_range is None else self.byte_range[1] - self.byte_range[0] + 1
        sent = 0
        while left is None or left > 0:
            n = 1 << 16 if left is None else min(1 << 16, left)
            if self.drop is not None:
                n = min(n, self.drop - sent)
                if n <= 0:
                    self.close_connection = True  # the declared length is not reached: the client sees a drop
                    return
            chunk = source.read(n)
            if not chunk:
                return
            outputfile.write(chunk)
            outputfile.flush()
            sent += len(chunk)
            left = None if left is None else left - len(chunk)
            if self.pause:
                time.sleep(self.pause)


class RangeWeb:
    """Serve `root` (laid out as a mirror: <host>/<path>) with faults; a context manager like StaticServer."""

    def __init__(self, root: Path):
        import functools

        self.root = root
        self.faults = Faults()
        self.server = StaticServer(root, handler=functools.partial(FaultyHandler, faults=self.faults))
        self.server.httpd.handle_error = lambda request, address: None  # a client killed mid-body is expected

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def endpoint(self) -> str:
        return self.url.removeprefix("http://")

    def __enter__(self) -> RangeWeb:
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    def add(self, url: str, body: bytes) -> str:
        """Put `body` where the mirror serves `url` (https://host/path -> root/host/path); returns its URL path."""
        relative = url.split("://", 1)[1].split("?")[0]
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        return "/" + relative
