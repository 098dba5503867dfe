"""Every request to the web goes through one guarded opener: the web is hostile and a build runs for days.

What it enforces, per request (see FetchConfig for the knobs):
- http and https only, also after redirects; no proxies from the environment; no file:, ftp: or data:.
- No connection to loopback, private, link-local (cloud metadata), multicast or reserved addresses,
  checked on the resolved address that is actually connected to (so DNS cannot point us inside), unless
  the host and port are listed in `allowed_private_hosts` (a mirror or cache the operator runs on purpose).
- A response-size cap, a deadline over the whole request (connect, TLS, status line, headers, every
  redirect hop, body: a server that trickles any of them is cut off), and no content encodings (we ask
  for identity; a gzip bomb is refused, never inflated).
- Redirects are followed here, not by urllib, so that every hop gets the same checks and deadline.
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
import math
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from email.message import Message
from urllib.parse import quote, urljoin, urlsplit

ALLOWED_SCHEMES = ("http", "https")
RETRYABLE_HTTP = {429, 500, 502, 503, 504}
BACKOFF_HTTP = {429, 503}  # the server asked us to slow down
REDIRECT_HTTP = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
DEFAULT_PORTS = (80, 443)  # what a bare host in allowed_private_hosts allows


@dataclass(frozen=True)
class WebPolicy:
    timeout_s: float = 10.0  # per socket operation
    deadline_s: float = 60.0  # whole request: connect, headers, redirects, body
    max_bytes: int = 20_000_000
    retries: int = 2
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_per_host: int = 16
    allowed_private_hosts: frozenset[str] = frozenset()  # "host:port" entries; a bare "host" means ports 80, 443
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

    def __post_init__(self):
        # Parsed once, here: a malformed entry fails where the policy is made, not on every connection.
        endpoints = frozenset(e for entry in self.allowed_private_hosts for e in allowed_endpoints(entry))
        object.__setattr__(self, "_private_endpoints", endpoints)

    def allows_private(self, host: str, port: int) -> bool:
        return (host.lower(), port) in self._private_endpoints


def allowed_endpoints(entry: str) -> list[tuple[str, int]]:
    """`host:port` or `[v6]:port` allows that port only; a bare host only the default ports, never every port."""
    entry = entry.strip().lower()
    if entry.count(":") > 1 and not entry.startswith("["):
        entry = f"[{entry}]"  # a bare IPv6 address
    parts = urlsplit(f"//{entry}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"allowed_private_hosts: {entry!r} is not host or host:port") from None
    if not parts.hostname:
        raise ValueError(f"allowed_private_hosts: {entry!r} is not host or host:port")
    return [(parts.hostname, p) for p in ((port,) if port else DEFAULT_PORTS)]


class WebError(OSError):
    """A refusal of ours. The message starts with `pmd:<reason_code>:` so the code survives any wrapping."""

    def __init__(self, code: str, detail: str, retryable: bool = False):
        super().__init__(f"pmd:{code}: {detail}")
        self.code = code
        self.retryable = retryable


class _Clock:
    """One request's deadline: every socket operation may wait min(timeout_s, what is left), never more."""

    def __init__(self, policy: WebPolicy):
        self.timeout_s = policy.timeout_s
        self.deadline = time.monotonic() + policy.deadline_s

    def budget(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise WebError("deadline_exceeded", "the request took longer than deadline_s")
        return min(self.timeout_s, left)

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def lift(self) -> None:
        """From now on only timeout_s per operation: a streamed metadata body takes as long as it takes."""
        self.deadline = math.inf


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast only: not loopback, private, link-local (169.254.169.254), shared or reserved."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _guarded_create_connection(policy: WebPolicy, clock: _Clock, address, timeout=None, source_address=None):
    """Resolve, check every address, connect to a checked one (not a second resolution that could differ)."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise WebError("dns_error", f"{host}: {err}") from None
    allowed = policy.allows_private(host, port)
    last_error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not allowed and not is_public_address(ip):
            raise WebError("blocked_address", f"{host}:{port} resolves to non-public address {ip}")
        sock = socket.socket(family, socktype, proto)
        try:
            sock.settimeout(clock.budget())
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            sock.settimeout(clock.budget())  # what is left for the TLS handshake (a total in CPython's ssl)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    raise last_error or WebError("dns_error", f"{host}: no address")


class _DeadlineReader(io.RawIOBase):
    """A socket's raw reader that gives every recv only what is left of the deadline: a server trickling its
    status line or headers, or sending `100 Continue` forever, is cut off like one trickling its body."""

    def __init__(self, raw, sock, clock: _Clock):
        super().__init__()
        self._raw, self._sock, self._clock = raw, sock, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(self._clock.budget())
        return self._raw.readinto(buffer)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, clock: _Clock, **kwargs):
        super().__init__(sock, *args, **kwargs)
        # Nothing is read before begin(): swap the buffered socket file for one over the deadline reader.
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, clock))


class _DeadlineConnection:
    """Mixed into http.client's connections: guarded connect, and no send or read past the deadline."""

    def __init__(self, *args, policy: WebPolicy, clock: _Clock, **kwargs):
        super().__init__(*args, **kwargs)
        self._clock = clock
        self._create_connection = functools.partial(_guarded_create_connection, policy, clock)
        self.response_class = functools.partial(_DeadlineResponse, clock=clock)

    def send(self, data) -> None:
        if self.sock is not None:
            self.sock.settimeout(self._clock.budget())
        super().send(data)


class _GuardedHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: WebPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        connection = functools.partial(_GuardedHTTPConnection, policy=self.policy, clock=req.pmd_clock)
        return self.do_open(connection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: WebPolicy):
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        connection = functools.partial(_GuardedHTTPSConnection, policy=self.policy, clock=req.pmd_clock)
        return self.do_open(connection, req, context=self._context)


class _HandBackRedirects(urllib.request.BaseHandler):
    """A redirect comes back to GuardedOpener as a response: it follows them itself, each hop guarded."""

    def _hand_back(self, req, fp, code, msg, headers):
        return fp

    http_error_301 = http_error_302 = http_error_303 = http_error_307 = http_error_308 = _hand_back


def _single_hop_opener(policy: WebPolicy) -> urllib.request.OpenerDirector:
    """urllib's opener with only the guarded handlers: one request, one response, redirects not followed."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy),
        _HandBackRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


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


class _HostSlot:
    """The per-host slot one request holds: of the host it talks to now, and only that one.

    A redirect to the same host keeps its slot: waiting for a second one deadlocks as soon as every slot
    is held by a redirecting request. A redirect to another host gives the slot up before waiting for
    that host's, so no request ever waits while holding a slot (no cycle, no deadlock).
    """

    def __init__(self, opener: GuardedOpener):
        self._opener = opener
        self._host: str | None = None
        self._slot: threading.BoundedSemaphore | None = None

    def move_to(self, host: str) -> None:
        if host == self._host:
            return
        self.release()
        slot = self._opener.slot_for(host)
        slot.acquire()
        self._host, self._slot = host, slot

    def release(self) -> None:
        if self._slot is not None:
            self._slot.release()
            self._host, self._slot = None, None

    def __enter__(self) -> _HostSlot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class GuardedOpener:
    """Opens GET requests like urllib's OpenerDirector, through the guarded handlers, following redirects
    itself, with retries, backoff and per-host limits. `open` returns the body capped; `stream` streams it."""

    def __init__(self, policy: WebPolicy):
        self.policy = policy
        self._hop = _single_hop_opener(policy)
        self._host_slots: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(policy.max_per_host)
        )
        self._slots_lock = threading.Lock()

    def open(self, fullurl, data=None, timeout=None) -> BufferedResponse:
        url, headers = self._request_parts(fullurl)
        with _HostSlot(self) as slot:
            return self._open_with_retries(url, headers, slot)

    def stream(self, url):
        """One attempt, the deadline over connect, redirects and headers; the body is the caller's to read, with
        timeout_s per read and no deadline (a 13 GB archive takes as long as it takes). `url`: a string or a
        urllib Request (its headers, e.g. Range, go with every redirect hop)."""
        url, headers = self._request_parts(url)
        clock = _Clock(self.policy)
        with _HostSlot(self) as slot:
            response = _as_deadline_error(clock, self._follow, url, headers, clock, slot)
        clock.lift()
        return response

    def slot_for(self, host: str) -> threading.BoundedSemaphore:
        with self._slots_lock:
            return self._host_slots[host]

    def _request_parts(self, fullurl) -> tuple[str, dict[str, str]]:
        req = fullurl if isinstance(fullurl, urllib.request.Request) else urllib.request.Request(fullurl)
        scheme = urlsplit(req.full_url).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise WebError("url_scheme_not_allowed", f"only http and https are fetched, not {scheme or 'no scheme'}")
        headers = dict(req.header_items())
        if not req.has_header("User-agent"):
            headers["User-agent"] = f"Mozilla/5.0 (compatible; {self.policy.user_agent})"
        return req.full_url, headers

    def _open_with_retries(self, url: str, headers: dict, slot: _HostSlot) -> BufferedResponse:
        for attempt in range(self.policy.retries + 1):
            try:
                return self._open_once(url, headers, slot)
            except (OSError, http.client.HTTPException) as err:
                if attempt == self.policy.retries or not is_retryable(err):
                    raise
                time.sleep(self._backoff(attempt, err))
        raise AssertionError("unreachable")

    def _open_once(self, url: str, headers: dict, slot: _HostSlot) -> BufferedResponse:
        clock = _Clock(self.policy)
        return _as_deadline_error(clock, self._fetch_capped, url, headers, clock, slot)

    def _fetch_capped(self, url: str, headers: dict, clock: _Clock, slot: _HostSlot) -> BufferedResponse:
        with self._follow(url, headers, clock, slot) as response:
            encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding != "identity":
                raise WebError("content_encoding_refused", f"Content-Encoding {encoding[:40]} (we ask for identity)")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
                raise WebError("response_too_large", f"Content-Length {declared} > {self.policy.max_bytes}")
            body = _read_capped(response, self.policy.max_bytes)
            if declared and declared.isdigit() and len(body) < int(declared):
                raise WebError("truncated_body", f"{len(body)} of {declared} bytes", retryable=True)
            return BufferedResponse(response.url, response.status, response.headers, body)

    def _follow(self, url: str, headers: dict, clock: _Clock, slot: _HostSlot):
        """GET `url` and the redirects it leads to, each hop a guarded request of its own."""
        seen = set()
        for _ in range(MAX_REDIRECTS + 1):
            seen.add(url)
            req = urllib.request.Request(url, headers=headers)
            req.add_unredirected_header("Accept-Encoding", "identity")
            req.pmd_clock = clock  # read by the guarded handlers: the connection shares this request's deadline
            slot.move_to(req.host.lower())
            response = self._hop.open(req)
            if response.status not in REDIRECT_HTTP:
                return response
            url = _redirect_target(url, response)
            if url in seen:
                raise WebError("redirect_loop", f"redirected back to {url[:200]}")
        raise WebError("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    def _backoff(self, attempt: int, err: Exception) -> float:
        return backoff_delay(self.policy, attempt, err)


def backoff_delay(policy: WebPolicy, attempt: int, err: Exception) -> float:
    """Seconds before retry `attempt` (0, 1, ...): doubling from backoff_s, at least a 429/503's Retry-After,
    never over backoff_max_s."""
    delay = policy.backoff_s * (2**attempt)
    if isinstance(err, urllib.error.HTTPError) and err.code in BACKOFF_HTTP:
        retry_after = (err.headers or {}).get("Retry-After", "")
        if retry_after.strip().isdigit():
            delay = max(delay, float(retry_after))
    return min(delay, policy.backoff_max_s)


def _redirect_target(url: str, response) -> str:
    """Where a 30x points, as urllib would resolve it; http and https only. The redirect's body is not read."""
    with response:
        location = response.headers.get("Location") or response.headers.get("URI")
    if not location:
        raise WebError("redirect_error", f"HTTP {response.status} without a Location")
    target = quote(urljoin(url, location.strip()), encoding="iso-8859-1", safe=string.punctuation)
    if urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
        raise WebError("redirect_scheme_not_allowed", f"redirect to {target[:200]}")
    return target


def _as_deadline_error(clock: _Clock, call, *args):
    """A timeout or reset that happens once the deadline has passed is the deadline's doing: say so."""
    try:
        return call(*args)
    except urllib.error.HTTPError:
        raise
    except (OSError, http.client.HTTPException) as err:
        if clock.expired() and "pmd:" not in str(err):
            raise WebError("deadline_exceeded", f"the request took longer than deadline_s ({err})") from err
        raise


def _read_capped(response, max_bytes: int) -> bytes:
    """read1 returns what one recv gave, so the cap is checked as the body arrives (the deadline in each recv)."""
    buffer = io.BytesIO()
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return buffer.getvalue()
        buffer.write(chunk)
        if buffer.tell() > max_bytes:
            raise WebError("response_too_large", f"body over {max_bytes} bytes")


def is_retryable(err: Exception) -> bool:
    """A transient failure (timeout, reset, dropped connection, 429, 5xx): worth another attempt."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code in RETRYABLE_HTTP
    if isinstance(err, WebError):
        return err.retryable
    if isinstance(err, urllib.error.URLError):
        return is_retryable(err.reason) if isinstance(err.reason, Exception) else False
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


def stream_url(url, policy: WebPolicy):
    """A guarded GET whose body is streamed, not capped: for metadata files, which are gigabytes by design.

    `url` may be a urllib Request, for headers of the caller's (a download's Range and If-Range)."""
    return GuardedOpener(policy).stream(url)
