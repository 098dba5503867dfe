"""One storage layer for every read and write: local paths stay `pathlib.Path`, URLs become fsspec paths.

`as_path("s3://bucket/pmd")` gives a universal_pathlib UPath (the pathlib API over fsspec: `/`, `exists`,
`open`, `glob`, `read_text`, ...), so the code that names OUT/<source>/NNNNN.tar is the same for a local
folder, `s3://`, `gs://`, `file://` or any installed fsspec protocol. Credentials come only from where the
cloud SDKs look (environment, profiles, instance metadata): nothing here takes or stores them.

Object stores have no rename: `shards.files.atomic_path` writes a local temporary file and uploads it in
one piece, so an object appears whole when its upload completes, or not at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from pmd_pipeline.errors import PmdError


def as_path(value: str | Path) -> Path:
    """A local `Path` for local paths and file:// URLs, else a UPath for the URL's fsspec protocol."""
    if not isinstance(value, str):
        return value
    if value.startswith("file://"):
        return Path(value.removeprefix("file://"))
    if "://" not in value:
        return Path(value)
    protocol = value.split("://", 1)[0]
    try:
        from upath import UPath

        # No listings cache: other processes and nodes write beside us (shard tasks, token actors), and a cached
        # listing would hide their objects from exists() and glob() here.
        return UPath(value, use_listings_cache=False)
    except (ValueError, ImportError) as err:
        raise PmdError(f"{value}: no storage for protocol {protocol!r} ({err}); install its fsspec package") from None


def is_remote(path: Path) -> bool:
    """True for paths that live in an object store or behind a protocol (not the local file system)."""
    local = ("", "file", "local")
    return not type(path).__module__.startswith("pathlib") and getattr(path, "protocol", "") not in local


def url_of(path: Path) -> str:
    """The string a user would write for `path`: `s3://bucket/key` or a local path."""
    return str(path)


def local_scratch(path: Path, *parts: str) -> Path:
    """A local folder standing in for `path` where a library needs a real directory (img2dataset's work files,
    plan parts): `path` itself when local, else a folder under the temp dir named after the URL."""
    if not is_remote(path):
        return path.joinpath(*parts)
    digest = hashlib.sha1(url_of(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir(), "pmd-scratch", digest).joinpath(*parts)


def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it (a prefix, on object stores); nothing when it is not there."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.fs.rm(path.path, recursive=True)
    except FileNotFoundError:
        pass


def upload(local: Path, target: Path) -> None:
    """Put a local file at `target` in one piece (a single object appears when the upload completes)."""
    target.fs.put_file(str(local), target.path)


def list_names(folder: Path) -> list[str]:
    """The names of a folder's entries (empty when it does not exist); one listing call on object stores."""
    if not is_remote(folder):
        return os.listdir(folder) if folder.is_dir() else []
    try:
        return [PurePosixPath(p.rstrip("/")).name for p in folder.fs.ls(folder.path, detail=False)]
    except FileNotFoundError:
        return []


def check_writable(path: Path) -> None:
    """Fail at once, with what to do, when OUT cannot be written (missing bucket, no permission, no endpoint)."""
    if not is_remote(path):
        return
    probe = path / ".pmd-write-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as err:  # botocore, aiohttp and gcsfs raise many types; each is a clear stop here
        raise PmdError(storage_error_message(path, err)) from None


def check_readable(path: Path) -> None:
    """Fail at once, with what to do, when a remote input or build cannot be read."""
    if not is_remote(path):
        return
    try:
        path.fs.info(path.path)
    except FileNotFoundError:
        raise PmdError(f"{url_of(path)} does not exist (check the bucket and the path)") from None
    except Exception as err:
        raise PmdError(storage_error_message(path, err)) from None


def storage_error_message(path: Path, err: Exception) -> str:
    """One line naming the problem and what to do; the error's text never carries credentials (it comes from the
    store's response), and no secret is added here."""
    text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        hint = "permission denied: give these credentials write access, or choose another location"
    elif isinstance(err, FileNotFoundError) or "NoSuchBucket" in text:
        hint = "the bucket does not exist: create it first, or fix the URL"
    elif "connect" in text.lower() or "endpoint" in text.lower() or isinstance(err, ConnectionError):
        hint = "the storage endpoint is unreachable: check AWS_ENDPOINT_URL (or your profile) and the network"
    else:
        hint = "check the URL, your credentials (environment, profile or instance metadata) and the endpoint"
    return f"cannot use {url_of(path)}: {hint} ({text})"
