"""A small HTTP proxy in front of the S3 server that misbehaves on purpose: 503s and connection resets for a while.

It forwards every request byte for byte (moto does not check signatures against the Host header), and for
the first `faulty_requests` requests answers every `every`-th one with a 503 SlowDown or a reset instead.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class FaultyProxy:
    def __init__(self, upstream: str, every: int = 5, faulty_requests: int = 400):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.every, self.faulty_requests = every, faulty_requests
        self.requests = self.faults = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(request)
        with self.lock:
            self.requests += 1
            fault = self.requests <= self.faulty_requests and self.requests % self.every == 0
            kind = "reset" if (self.requests // self.every) % 2 else "503"
            self.faults += fault
        if fault and kind == "reset":
            request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            request.connection.close()  # RST: the client sees "connection reset by peer"
            request.close_connection = True
            return
        if fault:
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            request.send_response(503)
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
            return
        self._forward(request, body)

    def _forward(self, request, body: bytes) -> None:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers["Content-Length"] = str(len(body))
        conn.request(request.command, request.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        request.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_HEADERS | {"content-length"}:
                request.send_header(key, value)
        length = response.getheader("Content-Length") if request.command == "HEAD" else str(len(data))
        request.send_header("Content-Length", length or "0")  # a HEAD's length is the object's, not its empty body
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)
        conn.close()


def _read_body(request) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(request.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while request.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))
