"""A web server on 127.0.0.1 that misbehaves on purpose, one fault per path (see FAULTS)."""

from __future__ import annotations

import gzip
import io
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def jpeg(size=(64, 48), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's first bytes are all a reader needs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


OK_JPEG = jpeg()
GZIP_BOMB = gzip.compress(b"\x00" * 20_000_000, compresslevel=9)  # 20 MB of zeros in about 20 KB

# path -> the reason code a fetch of it must end with (None: it must succeed)
FAULTS = {
    "/ok.jpg": None,
    "/status/404": "http_404",
    "/status/403": "http_403",
    "/status/429": "http_429",
    "/status/500": "http_500",
    "/status/503": "http_503",
    "/reset": "connection_reset",
    "/hang": "timeout",
    "/trickle": "deadline_exceeded",
    "/trickle-status": "deadline_exceeded",  # the status line, one byte at a time, each within timeout_s
    "/trickle-headers": "deadline_exceeded",
    "/continue-flood": "deadline_exceeded",  # `100 Continue` forever, never a final status
    "/truncated": "truncated_body",
    "/html": "decode_error",
    "/empty": "decode_error",
    "/gzip-bomb": "content_encoding_refused",
    "/pixel-bomb.png": "image_too_many_pixels",
    "/corrupt.jpg": "decode_error",
    "/redirect-loop": "redirect_loop",
    "/chain/6": "too_many_redirects",  # one over MAX_REDIRECTS (5)
    "/redirect-metadata": "blocked_address",
    "/redirect-other-local-host": "blocked_address",
    "/redirect-file": "redirect_scheme_not_allowed",
    "/huge-declared": "response_too_large",
    "/huge-chunked": "response_too_large",
}

# Redirects the guard allows: each must end in the image (see _redirect for where they point).
REDIRECTS = [
    "/redirect/301",
    "/redirect/302",
    "/redirect/303",
    "/redirect/307",
    "/redirect/308",
    "/redirect-relative/a/b",  # Location: ../../ok.jpg
    "/redirect-scheme-relative",  # Location: //127.0.0.1:PORT/ok.jpg
    "/redirect-upper-scheme",  # Location: HTTP://127.0.0.1:PORT/ok.jpg
    "/chain/5",  # five redirects: the limit, allowed
    "/redirect-endless-body",  # a 302 whose body never ends: a redirect's body is never read
]


class HostileWeb:
    """Context manager: `.url(path)`, `.hits` (requests per path), `.max_concurrent` (per path)."""

    def __init__(self, hang_s: float = 3.0, trickle_s: float = 30.0):
        self.hits: Counter = Counter()
        self.in_flight: Counter = Counter()
        self.max_concurrent: Counter = Counter()
        self.lock = threading.Lock()
        self.hang_s = hang_s
        self.trickle_s = trickle_s  # how long the header trickles and the 100-Continue flood go on at most
        self.stopping = threading.Event()
        self.flaky_left: Counter = Counter()  # /flaky/<code>/<n>: fail n times, then serve the image
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True

    def url(self, path: str) -> str:
        return f"http://{self.endpoint}{path}"

    @property
    def endpoint(self) -> str:
        """host:port, as allowed_private_hosts takes it (a bare 127.0.0.1 allows only ports 80 and 443)."""
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler_class(self):
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._left = False  # one handler serves every request of a keep-alive connection
                with web.lock:
                    web.hits[self.path] += 1
                    for name in (self.path, "*"):  # "*": all paths together
                        web.in_flight[name] += 1
                        web.max_concurrent[name] = max(web.max_concurrent[name], web.in_flight[name])
                try:
                    self._serve()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    self._leave()

            def _leave(self):
                """Count the request as finished (once): before the response is sent where that matters."""
                if getattr(self, "_left", False):
                    return
                self._left = True
                with web.lock:
                    web.in_flight[self.path] -= 1
                    web.in_flight["*"] -= 1

            def _send(self, status: int, body: bytes, ctype="image/jpeg", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _trickle(self, head: bytes, byte: bytes, every_s: float):
                """Send `head`, then `byte` every `every_s` (each well within the client's timeout_s) until stopped."""
                self.wfile.write(head)
                self.wfile.flush()
                ends = time.monotonic() + web.trickle_s
                while time.monotonic() < ends and not web.stopping.is_set():
                    time.sleep(every_s)
                    self.wfile.write(byte)
                    self.wfile.flush()
                self.close_connection = True

            def _redirect(self, path: str, port: int):
                """A redirect the guard allows, or None when `path` is not one."""
                here = f"127.0.0.1:{port}"
                if path.startswith("/redirect/"):
                    return int(path.rsplit("/", 1)[1]), "/ok.jpg"
                if path.startswith("/redirect-relative/"):
                    return 302, "../../ok.jpg"
                if path == "/redirect-scheme-relative":
                    return 302, f"//{here}/ok.jpg"
                if path == "/redirect-upper-scheme":
                    return 302, f"HTTP://{here}/ok.jpg"
                if path.startswith("/chain/") and path != "/chain/0":
                    return 302, str(int(path.rsplit("/", 1)[1]) - 1)  # relative: /chain/n -> /chain/n-1
                if path.startswith("/redirect-to-port/"):  # another server of the test, on 127.0.0.1
                    return 302, f"http://127.0.0.1:{int(path.rsplit('/', 1)[1])}/ok.jpg"
                if path.startswith("/redirect-same-host/"):  # to a slow image on this host
                    self._leave()  # the client starts its next hop as soon as it has this answer
                    return 302, "/slow/" + path.rsplit("/", 1)[1]
                if path.startswith("/redirect-big/"):
                    return 302, "/big/" + path.rsplit("/", 1)[1]
                return None

            def _serve(self):  # noqa: C901 - one branch per fault reads best as a flat table
                path = self.path
                port = web.httpd.server_address[1]
                if path in ("/ok.jpg", "/chain/0") or path.startswith("/ok/"):
                    return self._send(200, OK_JPEG)
                redirect = self._redirect(path, port)
                if redirect:
                    return self._send(redirect[0], b"", "text/plain", [("Location", redirect[1])])
                if path == "/redirect-endless-body":
                    self.send_response(302)
                    self.send_header("Location", "/ok.jpg")
                    self.send_header("Content-Length", str(10**10))
                    self.end_headers()
                    return self._trickle(b"", b"x" * 65536, 0.001)
                if path.startswith("/big/"):
                    return self._send(200, b"x" * int(path.rsplit("/", 1)[1]), "text/plain")
                if path == "/trickle-status":
                    return self._trickle(b"HTTP/1.1 200 ", b"K", 0.2)
                if path == "/trickle-headers":
                    return self._trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a", 0.2)
                if path == "/continue-flood":
                    return self._trickle(b"", b"HTTP/1.1 100 Continue\r\n\r\n", 0.01)
                if path.startswith("/slow/"):
                    time.sleep(0.2)
                    # leave before answering: once the client has the body it may start its next request
                    # while this thread is still returning, which is not concurrency on the client side
                    self._leave()
                    return self._send(200, OK_JPEG)
                if path.startswith("/status/"):
                    code = int(path.rsplit("/", 1)[1])
                    return self._send(code, b"no", "text/plain", [("Retry-After", "0")])
                if path.startswith("/flaky/"):
                    _, _, code, times = path.split("/")
                    with web.lock:
                        failures = web.hits[path] <= int(times)
                    if failures:
                        return self._send(int(code), b"busy", "text/plain", [("Retry-After", "1")])
                    return self._send(200, OK_JPEG)
                if path == "/reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return None
                if path == "/hang":
                    time.sleep(web.hang_s)
                    return self._send(200, OK_JPEG)
                if path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(int(web.hang_s * 20)):
                        self.wfile.write(b"\xff")
                        self.wfile.flush()
                        time.sleep(0.05)
                    return None
                if path == "/truncated":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(OK_JPEG)))
                    self.end_headers()
                    self.wfile.write(OK_JPEG[: len(OK_JPEG) // 3])
                    self.close_connection = True
                    return None
                if path == "/html":
                    return self._send(200, b"<html><body>Not an image</body></html>", "text/html")
                if path == "/empty":
                    return self._send(200, b"")
                if path == "/gzip-bomb":
                    return self._send(200, GZIP_BOMB, headers=[("Content-Encoding", "gzip")])
                if path == "/pixel-bomb.png":
                    return self._send(200, png_claiming(100_000, 100_000), "image/png")
                if path == "/corrupt.jpg":
                    return self._send(200, OK_JPEG[:20] + bytes(range(256)) * 8)
                if path == "/redirect-loop":
                    return self._send(302, b"", headers=[("Location", "/redirect-loop")])
                if path == "/redirect-metadata":
                    return self._send(302, b"", headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
                if path == "/redirect-other-local-host":
                    return self._send(302, b"", headers=[("Location", f"http://localhost:{port}/ok.jpg")])
                if path == "/redirect-file":
                    return self._send(302, b"", headers=[("Location", "file:///etc/passwd")])
                if path == "/huge-declared":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**10))
                    self.end_headers()
                    self.wfile.write(b"\xff" * 1000)
                    return None
                if path == "/huge-chunked":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    block = b"\xff" * 65536
                    for _ in range(200):  # about 13 MB, over the tests' cap
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                return self._send(404, b"unknown fault", "text/plain")

        return Handler


class TrickledTls:
    """A TCP server on 127.0.0.1 that answers a TLS ClientHello with a 16 KB handshake record, one byte at a time."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stopping = threading.Event()
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.listener.close()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:  # closed before anyone connected
            return
        with conn:
            try:
                conn.recv(65536)  # the ClientHello
                conn.sendall(b"\x16\x03\x03\x40\x00")  # record header: handshake, TLS 1.2, 16384 bytes follow
                while not self.stopping.wait(0.2):
                    conn.sendall(b"\x02")
            except OSError:  # the client gave up
                pass
