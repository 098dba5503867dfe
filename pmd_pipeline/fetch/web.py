"""Every request to the web goes through one guarded opener: the web is hostile and a build runs for days.

What it enforces, per request (see FetchConfig for the knobs):
- http and https only, also after redirects; no proxies from the environment; no file:, ftp: or data:.
- No connection to loopback, private, link-local (cloud metadata), multicast or reserved addresses,
  checked on the resolved address that is actually connected to (so DNS cannot point us inside), unless
  the host is listed in `allowed_private_hosts` (a mirror or cache the operator runs on purpose).
- A response-size cap, an overall deadline (a server that trickles bytes forever is cut off), and no
  content encodings (we ask for identity; a gzip bomb is refused, never inflated).
- Retries of transient failures with exponential backoff; 429/503 honour Retry-After (capped).
- At most `max_per_host` requests in flight per host in this process (politeness).

img2dataset's downloader calls `urllib.request.urlopen`; `installed(policy)` makes that call go through
this opener for the duration of one shard, which is urllib's own extension point for exactly this.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
RETRYABLE_HTTP = {429, 500, 502, 503, 504}
BACKOFF_HTTP = {429, 503}  # the server asked us to slow down


@dataclass(frozen=True)
class WebPolicy:
    timeout_s: float = 10.0  # per socket operation
    deadline_s: float = 60.0  # whole request, body included
    max_bytes: int = 20_000_000
    retries: int = 2
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_per_host: int = 16
    allowed_private_hosts: frozenset[str] = frozenset()
    user_agent: str = "pmd-pipeline"

    @classmethod
    def from_config(cls, fetch) -> WebPolicy:
        return cls(
            timeout_s=fetch.timeout_s,
            deadline_s=fetch.deadline_s,
            max_bytes=fetch.max_response_bytes,
            retries=fetch.retries,
            backoff_s=fetch.backoff_s,
            backoff_max_s=fetch.backoff_max_s,
            max_per_host=fetch.max_per_host,
            allowed_private_hosts=frozenset(h.lower() for h in fetch.allowed_private_hosts),
            user_agent=fetch.user_agent_token,
        )


class WebError(OSError):
    """A refusal of ours. The message starts with `pmd:<reason_code>:` so the code survives any wrapping."""

    def __init__(self, code: str, detail: str, retryable: bool = False):
        super().__init__(f"pmd:{code}: {detail}")
        self.code = code
        self.retryable = retryable


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast only: not loopback, private, link-local (169.254.169.254), shared or reserved."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _guarded_create_connection(policy: WebPolicy, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """Resolve, check every address, connect to a checked one (not a second resolution that could differ)."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise WebError("dns_error", f"{host}: {err}") from None
    allowed = host.lower() in policy.allowed_private_hosts
    last_error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not allowed and not is_public_address(ip):
            raise WebError("blocked_address", f"{host} resolves to non-public address {ip}")
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    raise last_error or WebError("dns_error", f"{host}: no address")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: WebPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_create_connection, policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, policy: WebPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_create_connection, policy)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: WebPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTPConnection, policy=self.policy), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: WebPolicy):
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTPSConnection, policy=self.policy), req, context=self._context)


class _HttpOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ALLOWED_SCHEMES:
            raise WebError("redirect_scheme_not_allowed", f"redirect to {newurl[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass
class BufferedResponse:
    """What img2dataset needs of a response (headers, read, a context manager), with the body already capped."""

    url: str
    status: int
    headers: Message
    body: bytes

    def read(self, amt: int | None = None) -> bytes:
        return self.body if amt is None else self.body[:amt]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


class GuardedOpener(urllib.request.OpenerDirector):
    """An OpenerDirector with only the guarded handlers, plus retries, backoff and per-host limits in open()."""

    def __init__(self, policy: WebPolicy):
        super().__init__()
        self.policy = policy
        for handler in (
            _GuardedHTTPHandler(policy),
            _GuardedHTTPSHandler(policy),
            _HttpOnlyRedirectHandler(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
            urllib.request.UnknownHandler(),
        ):
            self.add_handler(handler)
        self._host_slots: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(policy.max_per_host)
        )
        self._slots_lock = threading.Lock()

    def open(self, fullurl, data=None, timeout=None):
        req = fullurl if isinstance(fullurl, urllib.request.Request) else urllib.request.Request(fullurl)
        scheme = urlsplit(req.full_url).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise WebError("url_scheme_not_allowed", f"only http and https are fetched, not {scheme or 'no scheme'}")
        req.add_unredirected_header("Accept-Encoding", "identity")
        if not req.has_header("User-agent"):
            req.add_header("User-Agent", f"Mozilla/5.0 (compatible; {self.policy.user_agent})")
        with self._host_slot(req.host.lower()):
            return self._open_with_retries(req)

    @contextlib.contextmanager
    def _host_slot(self, host: str):
        with self._slots_lock:
            slot = self._host_slots[host]
        with slot:
            yield

    def _open_with_retries(self, req) -> BufferedResponse:
        for attempt in range(self.policy.retries + 1):
            try:
                return self._open_once(req)
            except (OSError, http.client.HTTPException) as err:
                if attempt == self.policy.retries or not _retryable(err):
                    raise
                time.sleep(self._backoff(attempt, err))
        raise AssertionError("unreachable")

    def _open_once(self, req) -> BufferedResponse:
        deadline = time.monotonic() + self.policy.deadline_s
        with super().open(req, timeout=self.policy.timeout_s) as response:
            encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding != "identity":
                raise WebError("content_encoding_refused", f"Content-Encoding {encoding[:40]} (we ask for identity)")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
                raise WebError("response_too_large", f"Content-Length {declared} > {self.policy.max_bytes}")
            body = _read_capped(response, self.policy.max_bytes, deadline)
            if declared and declared.isdigit() and len(body) < int(declared):
                raise WebError("truncated_body", f"{len(body)} of {declared} bytes", retryable=True)
            return BufferedResponse(response.url, response.status, response.headers, body)

    def _backoff(self, attempt: int, err: Exception) -> float:
        delay = self.policy.backoff_s * (2**attempt)
        if isinstance(err, urllib.error.HTTPError) and err.code in BACKOFF_HTTP:
            retry_after = (err.headers or {}).get("Retry-After", "")
            if retry_after.strip().isdigit():
                delay = max(delay, float(retry_after))
        return min(delay, self.policy.backoff_max_s)


def _read_capped(response, max_bytes: int, deadline: float) -> bytes:
    """read1 returns what one recv gave, so the deadline is checked even while a server trickles."""
    buffer = io.BytesIO()
    while True:
        if time.monotonic() > deadline:
            raise WebError("deadline_exceeded", "the response took longer than deadline_s")
        chunk = response.read1(65536)
        if not chunk:
            return buffer.getvalue()
        buffer.write(chunk)
        if buffer.tell() > max_bytes:
            raise WebError("response_too_large", f"body over {max_bytes} bytes")


def _retryable(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code in RETRYABLE_HTTP
    if isinstance(err, WebError):
        return err.retryable
    if isinstance(err, urllib.error.URLError):
        return _retryable(err.reason) if isinstance(err.reason, Exception) else False
    if isinstance(err, http.client.IncompleteRead | http.client.RemoteDisconnected):
        return True
    return isinstance(err, TimeoutError | ConnectionError | socket.timeout)


_install_lock = threading.Lock()


@contextlib.contextmanager
def installed(policy: WebPolicy):
    """Route urllib.request.urlopen (img2dataset's downloads) through a GuardedOpener while the block runs."""
    with _install_lock:
        previous = urllib.request._opener
        urllib.request.install_opener(GuardedOpener(policy))
    try:
        yield
    finally:
        with _install_lock:
            urllib.request.install_opener(previous)


def stream_url(url: str, policy: WebPolicy):
    """A guarded GET whose body is streamed, not capped: for metadata files, which are gigabytes by design."""
    opener = GuardedOpener(policy)
    if urlsplit(url).scheme.lower() not in ALLOWED_SCHEMES:
        raise WebError("url_scheme_not_allowed", f"only http and https are fetched: {url[:200]}")
    return urllib.request.OpenerDirector.open(opener, url, timeout=policy.timeout_s)
