"""Short snake_case reason codes for failed samples; the raw error text goes only into the shard parquet."""

from __future__ import annotations

import re

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
_OURS = re.compile(r"pmd:([a-z0-9_]+):")  # pmd_pipeline.fetch.web.WebError and the guarded resizer

# urllib reports these as "HTTP Error 30x: ...": the redirect is the story, not its status code.
_REDIRECT_PATTERNS = [
    ("infinite loop", "redirect_loop"),  # also "more than max_redirections"
    ("redirection to url", "redirect_scheme_not_allowed"),  # urllib refuses file:, data: ... targets itself
]

# (pattern in the lower-cased error text, code); first match wins.
_PATTERNS = [
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("connection refused", "connection_refused"),
    ("connection reset", "connection_reset"),
    ("remote end closed connection", "connection_closed"),
    ("name or service not known", "dns_error"),
    ("nodename nor servname", "dns_error"),
    ("temporary failure in name resolution", "dns_error"),
    ("certificate", "tls_error"),
    ("ssl", "tls_error"),
    ("redirect", "redirect_error"),
    ("incompleteread", "truncated_body"),
    ("incomplete read", "truncated_body"),
    ("x-robots-tag", "disallowed_by_robots_tag"),
    ("image decoding error", "decode_error"),
    ("image too small", "image_too_small"),
    ("image area too large", "image_too_large"),
    ("aspect ratio too large", "aspect_ratio_too_large"),
    ("hash mismatch", "hash_mismatch"),
    ("unknown url type", "url_scheme_not_allowed"),
]


def reason_code(error: str | None) -> str:
    """Map an error message (img2dataset's, urllib's, ours) to a stable reason code."""
    if not error:
        return "unknown_error"
    ours = _OURS.search(error)
    if ours:
        return ours.group(1)
    lowered = error.lower()
    for pattern, code in _REDIRECT_PATTERNS:
        if pattern in lowered:
            return code
    status = _HTTP_STATUS.search(error)
    if status:
        return f"http_{status.group(1)}"
    for pattern, code in _PATTERNS:
        if pattern in lowered:
            return code
    return "download_error"
